"""Interop families: the subject's model keeps working with the Transformers and PyTorch
features a user combines it with, judged against the stock model (same seed, same weights).

One process, ``autoep_size`` 1, the subject's in-process ``apply``:

- ``compile``: ``torch.compile(backend="aot_eager")`` (fullgraph where the stock model compiles
  fullgraph on this version) gives the logits, loss, aux loss and gradients of the uncompiled
  subject and of the stock model; compile seconds of both are recorded;
- ``param_order``: ``named_parameters()``, ``named_buffers()`` and ``state_dict()`` keys equal the
  stock model's, in order; a stock AdamW state (one stock step) loads into an optimizer over the
  subject's parameters, lands on the parameters of the same names, and the next step equals the
  stock model's next step;
- ``generate``: greedy ``generate`` (KV cache) gives the stock model's token ids on a prompt whose
  routing and argmax decisions are away from ties;
- ``grad_checkpointing``: with ``gradient_checkpointing_enable()``, loss and every gradient equal
  the stock model's with checkpointing and the subject's without, and the MoE blocks really are
  recomputed;
- ``hf_roundtrip``: ``save_pretrained`` of the subject's model (and the subject's own exporter,
  ``autoep.save_pretrained`` for AutoEP) loads with ``from_pretrained`` into the stock class with
  bit-identical weights and the stock model's logits.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field

import torch
from torch import nn

import autoep
from conformance.equivalence import (MarginsOnly, _compare_runs, away_from_ties, batch,
                                     experts_level, layouts, tie_free_batch)
from conformance.runs import RunOutput, run_model
from conformance.tolerances import ARGMAX_NEAR_TIE, Comparison, compare, tolerance
from conformance.training import ADAMW
from matrix.cells import INTEROP_FAMILIES
from matrix.models import ModelCase
from reference.model import ReferenceModel

FAMILIES = INTEROP_FAMILIES  # the matrix's axis: compile, param_order, generate, grad_checkpointing, hf_roundtrip
GENERATE_PROMPT = (2, 6)  # prompts x prompt length
GENERATE_NEW_TOKENS = 4


@dataclass
class InteropResult:
    family: str
    checks: list[Comparison] = field(default_factory=list)
    detail: dict = field(default_factory=dict)  # measurements (compile seconds, prompt seed, ...)
    findings: list[str] = field(default_factory=list)
    not_applicable: str | None = None  # why the stock model itself cannot be judged with this feature

    def failures(self) -> list[str]:
        return [str(check) for check in self.checks if not check.ok]


def run_family(family: str, case: ModelCase, subject, dtype: torch.dtype, seed: int = 0) -> InteropResult:
    if family not in FAMILIES:
        raise ValueError(f"unknown interop family {family!r}; known: {', '.join(FAMILIES)}")
    result = InteropResult(family)
    FAMILY_CHECKS[family](case, subject, dtype, seed, result)
    return result


def flag(what: str, ok: bool, difference: float = 0.0) -> Comparison:
    """A yes/no check as a Comparison (a failed one reports an infinite difference)."""
    return Comparison(what, difference if ok else float("inf"), 0.0 if ok else float("inf"), ok)


# ---- shared machinery -------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def routing_oracle(case: ModelCase, stock: nn.Module) -> ReferenceModel:
    """The reference model of ``stock`` (float32 weights for bf16), used to find inputs whose
    routing decisions are away from ties (see equivalence.NEAR_TIE)."""
    source = stock if next(stock.parameters()).dtype == torch.float32 else copy.deepcopy(stock).float()
    return ReferenceModel(source, layouts(autoep.inspect(stock, case.block())), compute_dtype=torch.float64,
                          with_aux_loss=case.has_aux_loss)


def margin_models(case: ModelCase, stock: nn.Module, applied: nn.Module) -> list[nn.Module]:
    models = [routing_oracle(case, stock)]
    if experts_level(applied):  # the model's own routers decide: the oracle and the stock model must agree
        models += [stock, MarginsOnly(applied)]
    elif autoep.replaced_layers(applied):  # the subject's own low-precision router inputs drift
        models.append(applied)
    return models


def stock_and_subject(case: ModelCase, subject, dtype: torch.dtype, seed: int) -> tuple[nn.Module, nn.Module]:
    stock = case.build(seed=seed, dtype=dtype)
    return stock, subject.apply(copy.deepcopy(stock), case.block(autoep_size=1))


def judged(name: str, subject_run: RunOutput, stock_run: RunOutput, subject_plain: RunOutput,
           dtype: torch.dtype, with_aux: bool) -> list[Comparison]:
    """The subject with a feature vs the stock model with it. float32: elementwise (or within 2x
    the plain subject's distance). bf16: relative L2 <= max(1e-2, 2x the plain subject's distance
    from the stock model): a feature must not move the subject away from Transformers; the plain
    subject's own bf16 error is bounded against the oracle by the equivalence cells."""
    checks = _compare_runs(subject_run, stock_run, tolerance(dtype), with_aux, baseline=subject_plain)
    for check in checks:
        check.what = f"{name}: {check.what}"
    return checks


def _strip_compiled(run: RunOutput) -> RunOutput:
    run.grads = {name.removeprefix("_orig_mod."): grad for name, grad in run.grads.items()}
    return run


def _timed_compile_run(model: nn.Module, input_ids: torch.Tensor, fullgraph: bool) -> tuple[RunOutput, float]:
    torch._dynamo.reset()
    started = time.perf_counter()
    run = run_model(torch.compile(model, backend="aot_eager", fullgraph=fullgraph), input_ids)
    return _strip_compiled(run), time.perf_counter() - started


# ---- families ---------------------------------------------------------------------------------

def check_compile(case: ModelCase, subject, dtype: torch.dtype, seed: int, result: InteropResult) -> None:
    stock, applied = stock_and_subject(case, subject, dtype, seed)
    input_ids, result.detail["input_seed"] = tie_free_batch(margin_models(case, stock, applied),
                                                            stock.config.get_text_config().vocab_size,
                                                            _dtype_name(dtype), seed + 7)
    # Eager runs first: Transformers installs its output-capturing hooks on the first call
    # (under a lock dynamo cannot trace), as any user's warm-up step would.
    stock_plain, applied_plain = run_model(stock, input_ids), run_model(applied, input_ids)
    # fullgraph where the stock model compiles fullgraph. The stock model is compiled in the
    # float32 cell (its compile seconds and the compiled-vs-compiled comparison); in bf16 only
    # when the subject does not compile fullgraph, to tell whose failure that is (each compile
    # costs ~7 s of CPU here, the interop budget is ~2-3 min per Transformers version).
    stock_tried = dtype == torch.float32
    stock_compiled, fullgraph = _compile_stock(stock, input_ids, result) if stock_tried else (None, True)
    while True:
        try:
            applied_compiled, applied_seconds = _timed_compile_run(applied, input_ids, fullgraph)
            break
        except Exception as error:
            subject_error = error
        finally:
            torch._dynamo.reset()
        if not stock_tried:
            stock_tried = True
            stock_compiled, stock_fullgraph = _compile_stock(stock, input_ids, result)
            if not stock_fullgraph:  # the stock model breaks the graph too: judge without fullgraph
                fullgraph = False
                continue
        if stock_compiled is None:  # the host model's own layers do not compile here either
            result.not_applicable = (f"the stock model does not compile on this Transformers/torch (see findings); "
                                     f"the subject raised {_first_line(subject_error)}")
        else:
            result.checks.append(flag(f"torch.compile(fullgraph={fullgraph}) of the subject raised "
                                      f"{_first_line(subject_error)}", False))
        return
    result.detail["fullgraph"] = fullgraph
    result.detail["subject_compile_seconds"] = round(applied_seconds, 2)
    if stock_compiled is not None:
        result.checks += judged("compiled subject~compiled stock", applied_compiled, stock_compiled,
                                applied_plain, dtype, case.has_aux_loss)
    result.checks += judged("compiled subject~stock", applied_compiled, stock_plain, applied_plain, dtype,
                            case.has_aux_loss)
    result.checks += judged("compiled subject~subject", applied_compiled, applied_plain, applied_plain, dtype,
                            case.has_aux_loss)


def _compile_stock(stock: nn.Module, input_ids: torch.Tensor, result: InteropResult) -> tuple:
    """The stock model's compiled run (None if it does not compile) and whether fullgraph.
    Without fullgraph it is tried again only after a graph break (dynamo's ``Unsupported``); any
    other error (e.g. in the compiled backward) recurs without fullgraph."""
    for fullgraph in (True, False):
        try:
            run, seconds = _timed_compile_run(stock, input_ids, fullgraph)
            result.detail["stock_compile_seconds"] = round(seconds, 2)
            return run, fullgraph
        except Exception as error:
            result.findings.append(f"the stock model does not compile (fullgraph={fullgraph}): {_first_line(error)}")
            if not isinstance(error, torch._dynamo.exc.Unsupported):
                break
        finally:
            torch._dynamo.reset()
    return None, False


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _names_in_order(what: str, actual: list[str], expected: list[str]) -> Comparison:
    if actual == expected:
        return flag(f"{what} ({len(expected)}) in the stock order", True)
    first = next((i for i, (a, e) in enumerate(zip(actual, expected)) if a != e), min(len(actual), len(expected)))
    got = actual[first] if first < len(actual) else "<end>"
    want = expected[first] if first < len(expected) else "<end>"
    same_set = "same names, other order" if sorted(actual) == sorted(expected) else "different names"
    return flag(f"{what} differ from the stock model's at position {first}: {got!r} where the stock model "
                f"has {want!r} ({same_set})", False)


def _adamw_step(model: nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    optimizer.step()


def check_param_order(case: ModelCase, subject, dtype: torch.dtype, seed: int, result: InteropResult) -> None:
    stock, applied = stock_and_subject(case, subject, dtype, seed)
    for what, listing in (("parameter names", lambda m: [n for n, _ in m.named_parameters()]),
                          ("buffer names", lambda m: [n for n, _ in m.named_buffers()]),
                          ("state_dict keys", lambda m: list(m.state_dict()))):
        result.checks.append(_names_in_order(what, listing(applied), listing(stock)))
    vocab = stock.config.get_text_config().vocab_size
    first_ids, _ = tie_free_batch(margin_models(case, stock, applied), vocab, _dtype_name(dtype), seed + 7)
    stock_optimizer = torch.optim.AdamW(stock.parameters(), **ADAMW)
    _adamw_step(stock, stock_optimizer, first_ids)
    # The subject's model after the stock step, and the stock optimizer's state loaded into an
    # optimizer over its parameters: Optimizer.load_state_dict maps state by parameter position.
    applied = subject.apply(copy.deepcopy(stock), case.block(autoep_size=1))
    applied_optimizer = torch.optim.AdamW(applied.parameters(), **ADAMW)
    try:
        # A copy, as from a file: load_state_dict keeps the saved "step" tensors themselves, so
        # both optimizers would count each other's steps.
        applied_optimizer.load_state_dict(copy.deepcopy(stock_optimizer.state_dict()))
    except Exception as error:
        result.checks.append(flag(f"the stock AdamW state did not load: {type(error).__name__}: {error}", False))
        return
    result.checks.append(_state_on_same_names(stock, stock_optimizer, applied, applied_optimizer))
    before = {name: p.detach().float().clone() for name, p in applied.named_parameters()}
    second_ids, result.detail["input_seed"] = tie_free_batch(margin_models(case, stock, applied), vocab,
                                                             _dtype_name(dtype), seed + 107)
    try:
        _adamw_step(stock, stock_optimizer, second_ids)
        _adamw_step(applied, applied_optimizer, second_ids)
    except Exception as error:
        result.checks.append(flag(f"the step after loading the stock AdamW state raised {type(error).__name__}: "
                                  f"{error}", False))
        return
    tol = tolerance(dtype, "optimizer_step")
    stock_params = dict(stock.named_parameters())
    for name, param in applied.named_parameters():
        if name not in stock_params:
            result.checks.append(flag(f"parameter {name} is not a stock parameter", False))
            continue
        result.checks.append(compare(f"AdamW update of {name}", param.detach().float() - before[name],
                                     stock_params[name].detach().float() - before[name], tol))


def _state_on_same_names(stock, stock_optimizer, applied, applied_optimizer) -> Comparison:
    """Each loaded AdamW state tensor sits on the subject's parameter of the same name as the
    stock parameter it came from (bit-identical)."""
    stock_params = dict(stock.named_parameters())
    for name, param in applied.named_parameters():
        expected = stock_optimizer.state.get(stock_params.get(name), {})
        actual = applied_optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in expected or key not in actual:
                return flag(f"AdamW state {key} missing for {name} after loading the stock state", False)
            if expected[key].shape != actual[key].shape or not torch.equal(expected[key], actual[key]):
                return flag(f"the loaded AdamW state {key} of {name} is not the stock state of {name} "
                            f"(state is mapped by parameter position)", False)
    return flag("loaded AdamW state lands on the parameters of the same names", True)


def _generate(model: nn.Module, prompt: torch.Tensor):
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=GENERATE_NEW_TOKENS, min_new_tokens=GENERATE_NEW_TOKENS,
                              do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0,
                              output_scores=True, return_dict_in_generate=True)
    # No aux loss while generating (Transformers 5.0's Mixtral fails computing it over a decode
    # step's attention mask: "size of tensor a (4) must match ... b (0)"), as inference runs it.
    extra = {"output_router_logits": False} if hasattr(model.config, "output_router_logits") else {}
    with torch.no_grad():
        return model.generate(prompt, generation_config=config, attention_mask=torch.ones_like(prompt), **extra)


def argmax_margin(scores: tuple[torch.Tensor, ...]) -> float:
    """Smallest (top-1 - top-2) / max|logit| over the generated positions."""
    margins = []
    for step in scores:
        logits = step.detach().double()
        top2 = logits.topk(2, dim=-1).values
        # Masked entries (a suppressed end-of-sequence token) are -inf: not part of the scale.
        scale = torch.where(logits.isfinite(), logits.abs(), 0).amax(dim=-1).clamp_min(1e-30)
        margins.append(float(((top2[:, 0] - top2[:, 1]) / scale).min()))
    return min(margins)


def check_generate(case: ModelCase, subject, dtype: torch.dtype, seed: int, result: InteropResult,
                   tries: int = 200) -> None:
    stock, applied = stock_and_subject(case, subject, dtype, seed)
    name = _dtype_name(dtype)
    vocab = stock.config.get_text_config().vocab_size
    checkers = margin_models(case, stock, applied)
    for attempt in range(tries):
        prompt = batch(vocab, seed + 29 + attempt, GENERATE_PROMPT)
        expected = _generate(stock, prompt)
        # Decisions of the whole sequence (prompt and generated tokens) and of each greedy pick
        # away from ties: a tie may legitimately go either way in another correct implementation.
        if argmax_margin(expected.scores) > ARGMAX_NEAR_TIE[name] and away_from_ties(checkers, expected.sequences,
                                                                                     name):
            break
    else:
        raise AssertionError(f"no prompt whose routing and greedy picks are away from ties in {tries} draws")
    result.detail.update(prompt_seed=seed + 29 + attempt, argmax_margin=round(argmax_margin(expected.scores), 4))
    actual = _generate(applied, prompt)
    same = actual.sequences.shape == expected.sequences.shape and torch.equal(actual.sequences, expected.sequences)
    result.checks.append(flag(f"greedy generate token ids ({GENERATE_NEW_TOKENS} new x {GENERATE_PROMPT[0]} prompts) "
                              f"{'equal' if same else 'differ: ' + str(actual.sequences.tolist())} "
                              f"{'' if same else 'vs stock ' + str(expected.sequences.tolist())}", same))
    if same:  # scores per step: informational, bounded as the forward logits are
        result.detail["scores_max_abs_diff"] = max(
            float(torch.where(e.isfinite(), a.double() - e.double(), 0).abs().max())
            for a, e in zip(actual.scores, expected.scores))


def _count_calls(model: nn.Module, names: list[str]) -> tuple[list[int], list]:
    """A one-element counter of forward calls of the named submodules, and the hooks to remove."""
    counter = [0]
    hooks = [model.get_submodule(name).register_forward_pre_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
             for name in names]
    return counter, hooks


def check_grad_checkpointing(case: ModelCase, subject, dtype: torch.dtype, seed: int,
                             result: InteropResult) -> None:
    stock, applied = stock_and_subject(case, subject, dtype, seed)
    input_ids, result.detail["input_seed"] = tie_free_batch(margin_models(case, stock, applied),
                                                            stock.config.get_text_config().vocab_size,
                                                            _dtype_name(dtype), seed + 7)
    blocks = [spec.name for spec in autoep.inspect(stock, case.block())]
    stock.train(), applied.train()  # Transformers checkpoints only in training mode (no dropout here)
    applied_plain = run_model(applied, input_ids)
    for model in (stock, applied):  # the newer name where this Transformers has it
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    counter, hooks = _count_calls(applied, blocks)
    try:
        stock_ckpt, applied_ckpt = run_model(stock, input_ids), run_model(applied, input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    # Forward once, recomputed once in the backward pass: twice per MoE block.
    result.checks.append(flag(f"MoE blocks recomputed under checkpointing ({counter[0]} calls for "
                              f"{len(blocks)} blocks)", counter[0] == 2 * len(blocks)))
    result.checks += judged("checkpointed subject~checkpointed stock", applied_ckpt, stock_ckpt, applied_plain,
                            dtype, case.has_aux_loss)
    result.checks += judged("checkpointed subject~subject", applied_ckpt, applied_plain, applied_plain, dtype,
                            case.has_aux_loss)


def _exporters(subject) -> list[tuple[str, object]]:
    exporters = [("model.save_pretrained", lambda model, folder: model.save_pretrained(folder))]
    if hasattr(subject, "save_pretrained"):  # the subject's documented exporter
        exporters.append((f"{subject.name}.save_pretrained", subject.save_pretrained))
    return exporters


def _round_trip(model: nn.Module, export, stock_class, dtype: torch.dtype, input_ids: torch.Tensor) -> tuple:
    """Export ``model``, load the folder into ``stock_class``: (loaded model, loading info,
    config.json as a dict, logits on ``input_ids``)."""
    import json

    with tempfile.TemporaryDirectory(prefix="autoep-interop-") as parent:
        folder = f"{parent}/export"  # exporters may refuse an existing folder
        export(model, folder)
        with open(f"{folder}/config.json") as file:
            config = json.load(file)
        loaded, info = stock_class.from_pretrained(folder, dtype=dtype, attn_implementation="eager",
                                                   output_loading_info=True)
    loaded.eval()
    with torch.no_grad():
        # Fresh memory: weights mapped from a file sit at offsets set by its header, and CPU
        # kernels round differently on differently aligned data (measured: qwen2_moe float32,
        # two exporters' files, bit-identical weights at addresses = 24 vs 32 mod 64, logits
        # 3.6e-7 apart; identical once copied).
        for tensor in (*loaded.parameters(), *loaded.buffers()):
            tensor.data = tensor.data.clone()
        logits = loaded(input_ids=input_ids).logits
    return loaded, info, config, logits


def check_hf_roundtrip(case: ModelCase, subject, dtype: torch.dtype, seed: int, result: InteropResult) -> None:
    stock, applied = stock_and_subject(case, subject, dtype, seed)
    input_ids, result.detail["input_seed"] = tie_free_batch(margin_models(case, stock, applied),
                                                            stock.config.get_text_config().vocab_size,
                                                            _dtype_name(dtype), seed + 7)
    exact = tolerance(dtype, "checkpoint")
    stock_class = type(stock)
    # What to expect is the stock model after the same save and load: a loaded model keeps some
    # weights in float32 by its class's rules (DeepSeek's router under dtype=bf16) and recomputes
    # its non-persistent buffers (rotary frequencies) in float32, where the in-memory stock model
    # cast to bf16 holds everything in bf16. Values must also equal the in-memory stock weights.
    stock_loaded, _, stock_config, expected_logits = _round_trip(stock, _exporters(subject)[0][1], stock_class,
                                                                 dtype, input_ids)
    expected_state, memory_state = stock_loaded.state_dict(), stock.state_dict()
    for label, export in _exporters(subject):
        loaded, info, config, logits = _round_trip(applied, export, stock_class, dtype, input_ids)
        problems = {key: sorted(value)[:4] for key, value in info.items() if value}
        result.checks.append(flag(f"{label} -> {stock_class.__name__}.from_pretrained loads every key "
                                  f"{problems if problems else ''}", not problems))
        changed = sorted(key for key in config.keys() | stock_config.keys()
                         if key != "transformers_version" and config.get(key) != stock_config.get(key))
        result.checks.append(flag(f"{label}: config.json equals the stock model's "
                                  f"{'(differs in ' + str(changed[:6]) + ')' if changed else ''}", not changed))
        state = loaded.state_dict()
        result.checks.append(_names_in_order(f"{label}: loaded state_dict keys", list(state), list(expected_state)))
        for name, value in expected_state.items():
            if name not in state:
                continue
            if state[name].dtype != value.dtype:
                result.checks.append(flag(f"{label}: weight {name} loaded as {state[name].dtype}, the stock "
                                          f"model's round trip as {value.dtype}", False))
                continue
            result.checks.append(flag(f"{label}: weight {name} bit-identical to the stock round trip",
                                      torch.equal(state[name], value)))
            if name in memory_state:
                result.checks.append(compare(f"{label}: weight {name} vs the stock model", state[name],
                                             memory_state[name], exact))
        result.checks.append(compare(f"{label}: logits of the loaded model (stock round trip: same)", logits,
                                     expected_logits, exact))


FAMILY_CHECKS = {"compile": check_compile, "param_order": check_param_order, "generate": check_generate,
                 "grad_checkpointing": check_grad_checkpointing, "hf_roundtrip": check_hf_roundtrip}
