"""Train stage: UniPT tuned from activation caches. Never imports a backbone or ``transformers``."""

from unipt.train.allocator import use_one_malloc_arena

# Before any training thread exists (see unipt.train.allocator): the loader's threads allocate what training
# frees.
use_one_malloc_arena()
