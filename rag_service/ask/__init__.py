"""The ask path: a question's parameters, the fan-out to its selected packs and the merge of
their answers, and the per-replica pack worker that runs the engine over cached prefixes."""
