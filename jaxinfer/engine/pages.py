"""The KV pages of one data shard: a free list plus a reference count per page. Pure host code.

A page is free (count 0, on the free list) or referenced by one or more sequences. Sharing a page
(`share`) is what prefix caching and parallel samples of one prompt build on; today every page
has one owner. Page ids are local to the shard (0 .. num_pages-1).
"""

from __future__ import annotations


def pages_needed(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


class OutOfPages(Exception):
    """Raised by `PagePool.allocate` when the shard has too few free pages."""


class PagePool:
    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * num_pages

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_pages - len(self._free)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def allocate(self, count: int) -> list[int]:
        """`count` free pages, each with one reference; OutOfPages (taking nothing) when too few are free."""
        if count > len(self._free):
            raise OutOfPages(f"need {count} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(count)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        """One more reference to each of `pages` (all in use)."""
        for p in pages:
            if self._refs[p] < 1:
                raise AssertionError(f"page {p} is free; only pages in use can be shared")
            self._refs[p] += 1

    def release(self, pages: list[int]) -> None:
        """Drops one reference to each of `pages`; a page whose count reaches zero is free again."""
        for p in reversed(pages):
            if self._refs[p] < 1:
                raise AssertionError(f"page {p} released more often than referenced")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)
