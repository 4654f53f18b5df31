"""`--compile-cache DIR`: JAX's persistent compilation cache in DIR, refused when DIR holds AOT output
built for other versions or chips."""

from __future__ import annotations

import contextlib
import os
import threading

from jaxinfer.compilation.manifest import check_cache_dir


def use_compile_cache(path: str) -> None:
    """Sends every compilation from now on through JAX's persistent cache in `path`, all entries kept.

    Also when the process already compiled with another (or no) cache directory: JAX fixes the cache
    at the first compilation, so it is reset here.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    check_cache_dir(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.reset_cache()


_bypass_lock = threading.Lock()


@contextlib.contextmanager
def persistent_cache_bypassed():
    """Compilations inside neither read nor write JAX's persistent cache (process-wide, so nothing else
    should compile meanwhile). Executables that `jaxinfer.compilation.step_store` serializes must come
    from a real compile: on XLA:CPU an executable read back from JAX's cache serializes into one whose
    kernels cannot be found when it is loaded again ("Function ... not found")."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    with _bypass_lock:
        enabled = jax.config.jax_enable_compilation_cache
        jax.config.update("jax_enable_compilation_cache", False)
        compilation_cache.reset_cache()
        try:
            yield
        finally:
            jax.config.update("jax_enable_compilation_cache", enabled)
            compilation_cache.reset_cache()
