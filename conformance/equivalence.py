"""Equivalence case family: the subject's model, the original Transformers model and the
reference agree on logits, loss, aux loss and every gradient, and each MoE block agrees
on its own."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

import autoep
from autoep.experts_level import AutoEPExpertsMixin, ExpertsSpec
from autoep.interface import is_interface_module
from autoep.routing import router_logits
from matrix.models import ModelCase
from conformance.parallel import run_subject_on_ranks
from conformance.runs import RunOutput, farther_run, run_model
from conformance.subjects import Subject
from conformance.tolerances import Comparison, Tolerance, compare, set_cuda_numerics, tolerance
from reference.model import BlockLayout, ExpertsModuleLayout, ReferenceExperts, ReferenceModel, block_weights
from reference.moe import decision_margin, reference_block


@dataclass
class EquivalenceResult:
    case: str
    dtype: str
    tolerance: Tolerance
    comparisons: dict[str, list[Comparison]] = field(default_factory=dict)  # pair -> comparisons
    findings: list[str] = field(default_factory=list)  # where Transformers departs from the math
    input_seed: int | str | None = None  # how the input was drawn (tie_free_batch)

    @property
    def ok(self) -> bool:
        return all(c.ok for pair, items in self.comparisons.items() if pair in self.required for c in items)

    required = ("subject~reference", "subject~original")

    def max_diff(self, pair: str, prefix: str = "") -> float:
        values = [c.max_abs_diff for c in self.comparisons.get(pair, []) if c.what.startswith(prefix)]
        return max(values) if values else float("nan")

    def failures(self) -> list[str]:
        return [f"{pair}: {c}" for pair, items in self.comparisons.items() if pair in self.required
                for c in items if not c.ok]

    def to_json(self) -> dict:
        return {
            "case": self.case, "dtype": self.dtype, "ok": self.ok,
            "rtol": self.tolerance.rtol, "atol": self.tolerance.atol,
            "max_abs_diff": {pair: max((c.max_abs_diff for c in items), default=0.0)
                             for pair, items in self.comparisons.items()},
            "failures": self.failures(), "findings": self.findings,
        }


def layouts(specs: list) -> list[BlockLayout | ExpertsModuleLayout]:
    """The reference's layout of each spec: a whole block (:class:`autoep.MoELayerSpec`), or an
    experts module replaced at the experts level (:class:`autoep.experts_level.ExpertsSpec`)."""
    return [ExpertsModuleLayout(s.experts_path, s.layout.flags, s.gate, s.layout.up_name, s.float32_inside)
            if isinstance(s, ExpertsSpec) else
            BlockLayout(s.name, s.routing, s.router_attr, s.experts_attr, s.gate_up_name, s.down_name,
                        s.shared_attr, s.shared_gate_attr, s.activation, s.shared_activation,
                        s.activation_params, s.shared_activation_params) for s in specs]


def _is_experts_call_target(module: torch.nn.Module) -> bool:
    return isinstance(module, (AutoEPExpertsMixin, ReferenceExperts)) or is_interface_module(module)


def experts_level(model: torch.nn.Module) -> bool:
    """Whether ``model`` is judged by its routing decisions rather than by declared routing margins:
    an experts-level subject, a ReferenceModel of experts-level layouts, or a stock model whose
    experts modules have the uniform interface."""
    if isinstance(model, ReferenceModel):
        return model.experts_level
    units = autoep.replaced_layers(model)
    if units:
        return isinstance(units[0][1], AutoEPExpertsMixin)
    return any(is_interface_module(module) for module in model.modules())


def experts_decisions(model: torch.nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """The experts every token was routed to (``top_k_index``, each row sorted) at every call of an
    experts module, in call order: what an experts-level model decided on ``input_ids``."""
    root = model.model if isinstance(model, ReferenceModel) else model
    captured: list[torch.Tensor] = []

    def capture(module, args, kwargs):
        index = args[1] if len(args) > 1 else list(kwargs.values())[1 - len(args)]
        captured.append(index.detach().reshape(-1, index.shape[-1]).sort(dim=-1).values.cpu())

    hooks = [module.register_forward_pre_hook(capture, with_kwargs=True) for module in root.modules()
             if _is_experts_call_target(module)]
    try:
        with torch.no_grad():
            model(input_ids=input_ids.to(_device_of(model)))
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def router_margins(model: torch.nn.Module, input_ids: torch.Tensor) -> list[float]:
    """Experts-level models: the gap, relative to the largest magnitude, between each token's k-th and
    (k+1)-th router output, for every block's router (found as the block's submodule whose output
    holds one value per expert: ``[T, E]``, or a tuple led by it). It is the decision margin where the
    router chooses on that output (softmax routers); where it chooses on something else (a correction
    bias, groups) it is a stricter-than-needed filter, and the decisions' agreement is what decides."""
    root = model.model if isinstance(model, ReferenceModel) else model
    targets = [(name, module) for name, module in root.named_modules() if _is_experts_call_target(module)]
    outputs: dict[str, list[torch.Tensor]] = {}
    widths: dict[str, int] = {}
    hooks = []
    for name, experts in targets:
        parent = root.get_submodule(name.rpartition(".")[0]) if "." in name else root
        count = experts.spec.num_experts if isinstance(experts, AutoEPExpertsMixin) else experts.num_experts \
            if hasattr(experts, "num_experts") else None
        skip = {id(module) for module in experts.modules()}

        def capture(module, args, output, name=name, count=count):
            value = output[0] if isinstance(output, tuple) and output else output
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[-1] == count and \
                    value.is_floating_point():
                outputs.setdefault(name, []).append(value.detach().reshape(-1, count).double())

        def width(module, args, kwargs, name=name):
            index = args[1] if len(args) > 1 else list(kwargs.values())[1 - len(args)]
            widths[name] = index.shape[-1]

        hooks += [module.register_forward_hook(capture) for module in parent.modules() if id(module) not in skip]
        hooks.append(experts.register_forward_pre_hook(width, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=input_ids.to(_device_of(model)))
    finally:
        for hook in hooks:
            hook.remove()
    margins = []
    for name, captured in outputs.items():
        k = widths.get(name)
        for logits_TE in captured[:1]:  # the router's (the first module of the block to emit E values)
            if k is None or k >= logits_TE.shape[-1]:
                continue
            ranked = logits_TE.sort(dim=-1, descending=True).values
            scale = logits_TE.abs().amax(dim=-1).clamp_min(1e-30)
            margins += ((ranked[:, k - 1] - ranked[:, k]) / scale).tolist()
    return margins


def decisions_agree(models: list[torch.nn.Module], input_ids: torch.Tensor) -> bool:
    """Every model made the same routing decisions (experts-level models have no declared routing
    whose margins could be measured: a batch is usable when the models, which differ in precision
    and arithmetic (the oracle and the subject), all chose the same experts for every token)."""
    runs = [experts_decisions(model, input_ids) for model in models]
    return all(len(run) == len(runs[0]) and all(torch.equal(a, b) for a, b in zip(run, runs[0])) for run in runs)


def batch(vocab_size: int, seed: int, shape: tuple[int, int] = (2, 8)) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


# A routing decision closer than this (relative to the largest compared value) counts as a
# near-tie. Exact ties are frequent in bf16 (two logits rounding to the same value), and the
# tie rule of torch.topk is unspecified, so equality with Transformers is only defined away
# from ties; the inputs are drawn until no decision in any layer is that close.
NEAR_TIE = {"bfloat16": 4e-3, "float16": 2e-3, "float32": 1e-5, "float64": 1e-12}
# Experts-level models: the margins are read off the routers' own low-precision outputs (bf16 logits are
# quantised at 2^-8 = 0.4% of their magnitude), and the subject's hidden states differ from the stock
# model's by its float32 combine (the stock experts sum the k slots in bf16): measured, a router input 1
# bf16 ulp apart moved a layer-1 decision whose margin was 0.47% (qwen2_moe, bf16). Four times NEAR_TIE.
NEAR_TIE_EXPERTS_LEVEL = {name: 4 * value for name, value in NEAR_TIE.items()}


def _correction_bias(router: torch.nn.Module, routing) -> list[float] | None:
    return [float(b) for b in router.e_score_correction_bias] if routing.use_correction_bias else None


def _margins(routing, logits_TE: torch.Tensor, bias) -> list[float]:
    margins = []
    for logits_E in logits_TE.detach().to(torch.float64):
        scale = max(float(logits_E.abs().max()), 1e-30) if routing.score_func == "softmax" else 1.0
        margins.append(decision_margin(routing, logits_E, bias) / scale)
    return margins


def min_margin(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    """Smallest routing decision margin over all tokens and MoE layers of ``model`` (a
    ReferenceModel, whose blocks record their logits, or a model holding AutoEP layers, whose
    router inputs are captured: they are exactly what the routing decides on)."""
    margins: list[float] = []
    input_ids = input_ids.to(_device_of(model))
    with torch.no_grad():
        if isinstance(model, ReferenceModel):
            model(input_ids=input_ids)
            for layout, logits_TE in zip(model.layouts, model.records):
                router = model.model.get_submodule(layout.name)._modules[layout.router_attr]
                margins += _margins(layout.routing, logits_TE, _correction_bias(router, layout.routing))
            return min(margins)
        captured = []
        hooks = [layer.router_module().register_forward_pre_hook(
            lambda module, args, layer=layer: captured.append((layer, args[0]))) for _, layer in
            autoep.replaced_layers(model)]
        try:
            model(input_ids=input_ids)
        finally:
            for hook in hooks:
                hook.remove()
        for layer, hidden in captured:
            router = layer.router_module()
            logits_TE = router_logits(layer.routing, hidden.reshape(-1, hidden.shape[-1]), router.weight)
            margins += _margins(layer.routing, logits_TE, _correction_bias(router, layer.routing))
    return min(margins)


def _device_of(model: torch.nn.Module) -> torch.device:
    """Where ``model`` (a Transformers model, or a ReferenceModel) holds its parameters."""
    return next((model.model if isinstance(model, ReferenceModel) else model).parameters()).device


class MarginsOnly:
    """An experts-level model whose router margins count in :func:`away_from_ties` but whose decisions
    are not required to agree with the others' (the subject under test)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model


def away_from_ties(models: list, input_ids: torch.Tensor, dtype_name: str) -> bool:
    """No routing decision of any model is a near-tie on ``input_ids``: margins above NEAR_TIE for
    models with declared routing; for experts-level models, the same decisions in all of them
    (but those wrapped in :class:`MarginsOnly`) and router margins above NEAR_TIE in every one."""
    margins_only = [model.model for model in models if isinstance(model, MarginsOnly)]
    models = [model for model in models if not isinstance(model, MarginsOnly)]
    by_decisions = [model for model in models if experts_level(model)]
    by_margin = [model for model in models if not experts_level(model)]
    return all(min_margin(model, input_ids) > NEAR_TIE[dtype_name] for model in by_margin) and (
        not by_decisions or decisions_agree(by_decisions, input_ids)) and all(
        min(router_margins(model, input_ids), default=1.0) > NEAR_TIE_EXPERTS_LEVEL[dtype_name]
        for model in by_decisions + margins_only)


# Whole-batch draws before tie_free_batch assembles a batch sequence by sequence.
WHOLE_BATCH_DRAWS = 8


def tie_free_batch(models: list[torch.nn.Module], vocab: int, dtype_name: str, seed: int, tries: int = 200,
                   shape: tuple[int, int] = (2, 8)) -> tuple[torch.Tensor, int | str]:
    """A batch with no routing near-tie in any layer of any of ``models`` (the oracle, and the subject,
    whose low-precision hidden states drift). The first :data:`WHOLE_BATCH_DRAWS` draws are whole
    batches (from ``seed`` on). Then the batch is assembled sequence by sequence: the chance that a whole
    batch is tie-free is the product of its sequences' (measured: experts-level bf16 cells on 4 x 8
    tokens needed up to 170 whole draws, 88 s of a cell), while a sequence's routing does not depend
    on the other sequences, so each is drawn alone until it is tie-free; the assembled batch is then
    checked whole. Returns the batch and how to draw it again: an int (``batch(vocab, seed, shape)``)
    or ``"rows:s1,s2,..."`` (sequence i is ``batch(vocab, s_i, (1, length))``)."""
    for attempt in range(min(tries, WHOLE_BATCH_DRAWS)):
        input_ids = batch(vocab, seed + attempt, shape)
        if away_from_ties(models, input_ids, dtype_name):
            return input_ids, seed + attempt
    if shape[0] > 1:
        rows, seeds, row_seed = [], [], seed + tries  # apart from the whole-batch seeds
        while len(rows) < shape[0] and row_seed < seed + 2 * tries:
            candidate = batch(vocab, row_seed, (1, shape[1]))
            if away_from_ties(models, candidate, dtype_name):
                rows.append(candidate)
                seeds.append(row_seed)
            row_seed += 1
        if len(rows) == shape[0]:
            input_ids = torch.cat(rows)
            if away_from_ties(models, input_ids, dtype_name):
                return input_ids, "rows:" + ",".join(str(row) for row in seeds)
    for attempt in range(WHOLE_BATCH_DRAWS, tries):
        input_ids = batch(vocab, seed + attempt, shape)
        if away_from_ties(models, input_ids, dtype_name):
            return input_ids, seed + attempt
    raise AssertionError(f"no input without routing near-ties found in {tries} draws (threshold "
                         f"{NEAR_TIE[dtype_name]} for {dtype_name}); use a larger model or another seed")


def _compare_runs(a: RunOutput, b: RunOutput, tol: Tolerance, with_aux: bool,
                  baseline: RunOutput | None = None) -> list[Comparison]:
    """Compare run ``a`` with ``b`` (the expected one); ``baseline`` is another run against
    the same expected values whose error scales a bf16 bound (see tolerances)."""
    def base(kind: str, name: str | None = None):
        if baseline is None:
            return None
        return baseline.grads.get(name) if kind == "grad" else getattr(baseline, kind)

    # Where b's gradients are means of micro-batch gradients (several micro-batches): the mean norm of
    # those terms, and the baseline's mean error on them (see tolerances, cancelling means).
    terms_norm, baseline_terms_error = {}, {}
    for name, terms in (b.grad_terms or {}).items():
        terms_norm[name] = sum(float(term.double().norm()) for term in terms) / len(terms)
        if baseline is not None and baseline.grad_terms is not None and name in baseline.grad_terms:
            baseline_terms_error[name] = sum(float((base.double() - term.double()).norm())
                                             for base, term in zip(baseline.grad_terms[name], terms)) / len(terms)

    def scale(name: str, grad: torch.Tensor) -> float:
        return max(float(grad.double().norm()), terms_norm.get(name, 0.0))

    typical = None  # the baseline's median relative gradient error (see tolerances)
    if baseline is not None and tol.baseline_factor is not None:
        ratios = sorted(float((baseline.grads[n].double() - g.double()).norm()) / scale(n, g)
                        for n, g in b.grads.items() if n in baseline.grads and bool(g.any()))
        typical = ratios[len(ratios) // 2] if ratios else None

    def check(what, actual, expected, base_value, name=None):
        return compare(what, actual, expected, tol, base_value, typical, terms_norm.get(name),
                       baseline_terms_error.get(name))

    items = [check("logits", a.logits, b.logits, base("logits")), check("loss", a.loss, b.loss, base("loss"))]
    if with_aux:
        if a.aux_loss is None or b.aux_loss is None:
            items.append(Comparison("aux_loss (missing)", float("inf"), float("inf"), False))
        else:
            items.append(check("aux_loss", a.aux_loss, b.aux_loss, base("aux_loss")))
    if a.grads.keys() != b.grads.keys():
        missing = sorted(a.grads.keys() ^ b.grads.keys())
        items.append(Comparison(f"gradient names differ: {missing[:4]}", float("inf"), float("inf"), False))
    for name in sorted(a.grads.keys() & b.grads.keys()):
        items.append(check(f"grad {name}", a.grads[name], b.grads[name], base("grad", name), name))
    return items


def model_equivalence(case: ModelCase, subject: Subject, dtype: torch.dtype = torch.float32, seed: int = 0,
                      block: dict | None = None, world_size: int | None = None, autoep_size: int = 1,
                      device: str = "cpu") -> EquivalenceResult:
    """Subject vs reference vs original Transformers model on one global batch.

    ``world_size=None`` runs the subject in this process. Otherwise it runs on ``world_size``
    rank processes (:mod:`conformance.parallel`), each on its own micro-batch of the global
    batch, with ``autoep_size``; gradients are reduced as an engine would, and everything is
    compared with the single-process reference of the same data-parallel objective.

    ``device="cuda"``: the subject and the original model run on CUDA (in this process on
    ``cuda``, on rank processes each on its own GPU), the reference stays on the CPU; CUDA
    tolerances (conformance/tolerances.py CUDA_TOLERANCES).
    """
    if device == "cuda":
        set_cuda_numerics()
    tol = tolerance(dtype, "single" if world_size is None else "multi", device)
    original = case.build(seed=seed, dtype=dtype)
    result = EquivalenceResult(case.id, str(dtype).replace("torch.", ""), tol)
    block = case.block(**(block or {}))
    specs = autoep.inspect(original, block)
    # The reference computes its MoE blocks in float64 (cast back to the model dtype), so the
    # comparison measures the subject's rounding, not the oracle's. For bf16 the oracle is the
    # same (bf16-valued) weights upcast to float32.
    oracle_source = original if dtype == torch.float32 else copy.deepcopy(original).float()
    reference = ReferenceModel(oracle_source, layouts(specs), compute_dtype=torch.float64,
                               with_aux_loss=case.has_aux_loss)
    original.to(device)  # (in place: the specs keep pointing at its blocks); the reference was copied
    replaced = subject.apply(copy.deepcopy(original), dict(block or {}))
    margin_checks = [reference]
    if experts_level(replaced):
        # The model's own routers decide: the oracle and the stock model must agree on every decision,
        # and no router of theirs or the subject's (its own low-precision hidden states drift) may be
        # near a tie. The subject's decisions are not compared: a subject that routes differently is
        # judged by the comparisons, not by a failure to find inputs.
        margin_checks += [original, MarginsOnly(replaced)]
    elif autoep.replaced_layers(replaced):
        margin_checks.append(replaced)
    vocab = original.config.get_text_config().vocab_size
    micro_batches = world_size or 1
    shape = (2, 8) if world_size is None else (world_size, 8)  # one sequence per rank
    input_ids, result.input_seed = tie_free_batch(margin_checks, vocab, result.dtype, seed + 7, shape=shape)

    if case.has_aux_loss and not isinstance(specs[0], ExpertsSpec) and \
            specs[0].routing.recorded_output == "probabilities":
        result.findings.append(
            "this Transformers version records softmax probabilities in the router_logits slot, so its aux "
            "loss applies softmax twice; AutoEP reproduces it (RoutingSpec.recorded_output='probabilities')")
    if world_size is None:
        subject_run = run_model(replaced, input_ids)
    else:
        subject_run = run_subject_on_ranks(case, subject, dtype, seed, dict(block or {}), input_ids, world_size,
                                           autoep_size, device)
    reference_run = run_model(reference, input_ids, reference=True, micro_batches=micro_batches)
    try:
        original_run = run_model(original, input_ids, micro_batches=micro_batches)
    except Exception as error:  # a Transformers version whose own block cannot run this routing
        result.findings.append(f"original Transformers model raised {type(error).__name__}: {error}")
        original_run = None
    baseline = original_run
    if tol.metric == "norm":
        # bf16 has two legitimate roundings of the same math: Transformers' (each expert's output
        # rounded, the k slots summed in bf16) and the reference math run at the model's precision
        # (MoE blocks in float64, rounded once, as AutoEP's float32 combine does). Each tensor's
        # baseline is whichever of the two lies farther from the oracle (see tolerances).
        at_model_precision = run_model(ReferenceModel(original, layouts(specs), compute_dtype=torch.float64,
                                                 with_aux_loss=case.has_aux_loss), input_ids, reference=True,
                                  micro_batches=micro_batches)
        baseline = farther_run([at_model_precision] + ([original_run] if original_run is not None else []),
                               reference_run)
    result.comparisons["subject~reference"] = _compare_runs(subject_run, reference_run, tol, case.has_aux_loss,
                                                            baseline)
    if original_run is None:
        return result
    if tol.metric == "elementwise":
        result.comparisons["subject~original"] = _compare_runs(subject_run, original_run, tol, case.has_aux_loss)
        result.comparisons["original~reference"] = _compare_runs(original_run, reference_run, tol, case.has_aux_loss)
        departures = [c for c in result.comparisons["original~reference"] if not c.ok]
        if departures:
            result.findings.append(
                "the original Transformers model departs from the routing math: "
                + "; ".join(str(c) for c in departures[:3]))
    else:  # bf16: both were measured against the oracle above; this pair is informational
        result.comparisons["subject~original (info)"] = _compare_runs(subject_run, original_run, tol,
                                                                      case.has_aux_loss)
    return result


def block_equivalence(case: ModelCase, subject: Subject, dtype: torch.dtype = torch.float32, seed: int = 0,
                      num_tokens: int = 24, device: str = "cpu") -> list[EquivalenceResult]:
    """Each MoE block on its own: output and input gradient, original vs subject vs reference
    (``device``: where the subject and the original run; the reference runs on the CPU)."""
    if device == "cuda":
        set_cuda_numerics()
    tol = tolerance(dtype, "single", device)
    # One block from the same bf16 input: no baseline run, the plain relative-L2 bound applies.
    block_tol = tol if tol.baseline_factor is None else Tolerance(tol.rtol, tol.atol, tol.why, "norm")
    original = case.build(seed=seed, dtype=dtype)
    specs = autoep.inspect(original, case.block())
    replaced = subject.apply(copy.deepcopy(original).to(device), case.block())
    on_device = original if device == "cpu" else copy.deepcopy(original).to(device)  # the reference reads original
    if specs and isinstance(specs[0], ExpertsSpec):
        return _experts_modules_equivalence(case, specs, original, on_device, replaced, block_tol, tol, seed, device)
    results = []
    generator = torch.Generator().manual_seed(seed + 11)
    for spec in specs:
        result = EquivalenceResult(f"{case.id}:{spec.name}", str(dtype).replace("torch.", ""), tol)
        # The router as the original holds it (the subject's copy has the same weights; a peer's
        # block need not expose it the way AutoEP's router_module() does).
        router = getattr(original.get_submodule(spec.name), spec.router_attr)
        bias = _correction_bias(router, spec.routing)
        for _ in range(200):  # inputs away from routing near-ties (see NEAR_TIE)
            hidden = torch.randn(1, num_tokens, spec.hidden_size, generator=generator).to(dtype)
            with torch.no_grad():
                logits = router_logits(spec.routing, hidden.reshape(num_tokens, -1), router.weight)
            if min(_margins(spec.routing, logits, bias)) > NEAR_TIE[result.dtype]:
                break
        else:
            raise AssertionError(f"{result.case}: no block input without routing near-ties in 200 draws")
        upstream = torch.randn(1, num_tokens, spec.hidden_size, generator=generator).to(dtype)
        outputs = {}
        for label, module in (("subject", replaced.get_submodule(spec.name)),
                              ("original", on_device.get_submodule(spec.name)), ("reference", None)):
            x = hidden.to("cpu" if module is None else device).clone().requires_grad_(True)
            if module is None:
                out_TH, _, _ = reference_block(spec.routing, block_weights(original.get_submodule(spec.name), layouts([spec])[0]),
                                               x.reshape(num_tokens, -1), compute_dtype=torch.float64)
                out = out_TH.reshape(x.shape)
            else:
                try:
                    out = module(x)
                except Exception as error:
                    if label != "original":
                        raise
                    # a Transformers version whose own block raises for this routing
                    # (5.0-5.2 DeepSeek-V2 group_limited_greedy)
                    result.findings.append(f"original block raised {type(error).__name__}: {error}")
                    continue
            (out.float() * upstream.to(out.device).float()).sum().backward()
            outputs[label] = (out.detach().cpu(), x.grad.detach().cpu())
        for pair in (("subject", "reference"), ("subject", "original"), ("original", "reference")):
            if pair[0] not in outputs or pair[1] not in outputs:
                continue
            a, b = outputs[pair[0]], outputs[pair[1]]
            result.comparisons[f"{pair[0]}~{pair[1]}"] = [
                compare("block output", a[0], b[0], block_tol), compare("block input grad", a[1], b[1], block_tol)]
        results.append(result)
    return results


def experts_inputs(model: torch.nn.Module, paths: list[str], input_ids: torch.Tensor) -> dict[str, tuple]:
    """The (hidden_states, top_k_index, top_k_weights) each experts module at ``paths`` received
    in a forward of ``model`` on ``input_ids`` (its first call)."""
    captured: dict[str, tuple] = {}

    def capture(path):
        def hook(module, args, kwargs):
            values = list(args) + list(kwargs.values())
            captured.setdefault(path, tuple(value.detach().clone() for value in values[:3]))
        return hook

    hooks = [model.get_submodule(path).register_forward_pre_hook(capture(path), with_kwargs=True) for path in paths]
    try:
        with torch.no_grad():
            model(input_ids=input_ids.to(_device_of(model)))
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def _experts_modules_equivalence(case, specs, original, on_device, replaced, block_tol, tol, seed, device):
    """Experts-level blocks: each experts module on its own, called with the inputs the stock model's
    router handed it (captured), output and the gradients of the hidden states and of the routing
    weights: subject vs the stock module vs the reference (``reference.experts``, float64)."""
    paths = [spec.experts_path for spec in specs]
    vocab = original.config.get_text_config().vocab_size
    inputs = experts_inputs(original, paths, batch(vocab, seed + 11))
    generator = torch.Generator().manual_seed(seed + 13)
    for spec in specs:  # experts the forward never called (ERNIE-4.5-VL's vision experts on text): random routes
        if spec.experts_path not in inputs:
            dtype = next(original.get_submodule(spec.experts_path).parameters()).dtype
            index = torch.stack([torch.randperm(spec.num_experts, generator=generator)[:2] for _ in range(16)])
            inputs[spec.experts_path] = (torch.randn(16, spec.hidden_size, generator=generator).to(dtype), index,
                                         torch.rand(16, 2, generator=generator).to(dtype))
    results = []
    for spec, layout in zip(specs, layouts(specs)):
        result = EquivalenceResult(f"{case.id}:{spec.experts_path}", str(next(original.parameters()).dtype)
                                   .replace("torch.", ""), tol)
        hidden, index, weights = inputs[spec.experts_path]
        upstream = torch.randn(hidden.shape[0], spec.layout.output_size, generator=generator)
        reference = ReferenceExperts(layout, original.get_submodule(spec.experts_path), torch.float64)
        outputs = {}
        for label, module, where in (("subject", replaced.get_submodule(spec.experts_path), device),
                                     ("original", on_device.get_submodule(spec.experts_path), device),
                                     ("reference", reference, "cpu")):
            x = hidden.to(where).clone().requires_grad_(True)
            w = weights.to(where).clone().requires_grad_(True)
            out = module(x, index.to(where), w)
            (out.float() * upstream.to(where)).sum().backward()
            outputs[label] = (out.detach().cpu(), x.grad.detach().cpu(), w.grad.detach().cpu())
        for pair in (("subject", "reference"), ("subject", "original"), ("original", "reference")):
            a, b = outputs[pair[0]], outputs[pair[1]]
            result.comparisons[f"{pair[0]}~{pair[1]}"] = [
                compare("experts output", a[0], b[0], block_tol), compare("experts input grad", a[1], b[1], block_tol),
                compare("routing weights grad", a[2], b[2], block_tol)]
        results.append(result)
    return results
