"""Chat models with TransformerLens site names: loading (:mod:`~refusal_lab.models.loading`), the
hooked view (:mod:`~refusal_lab.models.hooked`), sites, edits, the block loop, generation and one
adapter per architecture."""
