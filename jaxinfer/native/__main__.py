"""`python -m jaxinfer.native`: builds every native kernel library into the cache now (`make install`
runs it), so no first use pays for the compile. A kernel that cannot build is reported in one line
and left to its XLA fallback; the exit status stays 0 so an install never fails on it."""

import sys

from jaxinfer import native


def main() -> int:
    for source in native.SOURCES:
        try:
            lib = native.load_library(source)
            print(f"jaxinfer.native: {source}: {lib._name}")
        except native.NativeUnavailable as e:
            print(f"jaxinfer.native: {source} unavailable, its XLA fallback will run: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
