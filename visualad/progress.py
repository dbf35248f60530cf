"""Progress bars for long work: tqdm on a terminal when asked, silent otherwise (logs, pipes, CI)."""
from __future__ import annotations

import sys
from typing import Any, Optional


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: Optional[int], enabled: bool = True, **kwargs: Any) -> Any:
    if not enabled or not sys.stderr.isatty():
        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, leave=False, **kwargs)
