"""Accuracy of compressed runs: Lambada last-word accuracy (`lambada`) and WikiText perplexity
(`wikitext`), each computed from a `logits_fn(inputs) -> logits` so that the same code scores the
offloading runtime (`cli`) and, in tests, transformers' OPT directly."""
