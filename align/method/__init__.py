"""The paper's method as pure functions (docs/method.md): the keyword rewrite and the LLM prompts
(`rewrite`, `prompts`), relevance x aesthetic re-ranking and the query-time baselines (`ranking`),
the u x v preference grid (`pairing`), retrieval DPO and the contrastive loss (`losses`). No I/O,
no Ray, no configuration: numpy, torch and strings. Imports nothing of align.
"""
