"""The mutant bank: deliberately broken subjects that measure the conformance suite's power.

Each mutant is the ``autoep`` subject with exactly one planted bug (a bug class a peer
shipped, or a classic expert-parallel mistake), planted per model / engine instance: autoep/
is never edited and no process-global patch outlives the call that needs it. Used from the
checkout like conformance/ (not installed); ``python -m mutants`` runs the bank (see
mutants/__main__.py). Users never run these subjects: they are not in
``conformance.subjects.SUBJECTS``.
"""
