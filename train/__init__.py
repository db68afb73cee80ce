"""Train stage: UniPT tuned from activation caches. Never imports a backbone or ``transformers``."""
