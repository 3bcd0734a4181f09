"""How ``flashmemory ask`` shows its answers: streamed as they are decoded, or whole, each with its accounting."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.control import strip_control_codes
from rich.markup import escape


class AnswerView:
    """Prints the answers to ``questions`` (a list the caller may extend as questions come).

    With ``stream``, each answer's text is shown as it comes (:meth:`piece`) and its accounting after it; else each
    answer whole with its accounting, or one JSON line each; every record as soon as its answer is whole.
    ``headers`` prints each question before its answer.
    """

    def __init__(self, console: Console, questions: list[str], *, stream: bool, as_json: bool, headers: bool) -> None:
        self.console, self.questions, self.headers = console, questions, headers
        self.stream, self.as_json = stream and not as_json, as_json
        self.current: int | None = None  # the answer being streamed
        self.shown: set[int] = set()

    def piece(self, i: int, text: str) -> None:
        """A piece of answer ``i``'s text, as the decode produced it."""
        if i != self.current:
            self._end_line()
            self._head(i)
            self.console.print("[bold]answer:[/] ", end="")
            self.current = i
        if i not in self.shown:
            text = text.lstrip()  # the records strip the answer; so does what is shown
            if not text:
                return
            self.shown.add(i)
        sys.stdout.write(strip_control_codes(text))  # as the console shows a whole answer: no cursor movement
        sys.stdout.flush()

    def record(self, i: int, result: dict) -> None:
        """Answer ``i``'s record, as soon as it is whole: the answer unless it was streamed, and its accounting."""
        self._end_line()
        if self.as_json:
            print(json.dumps(result), flush=True)
            return
        if not self.stream:
            self._head(i)
            self.console.print(f"[bold]answer:[/] {escape(result['answer'])}")
        self.console.print(
            f"[dim]{result['method']} · {result['context_tokens']} context tokens · device KV "
            f"{result['kv_bytes_device'] / 2**20:.2f} MiB of {result['kv_bytes_full'] / 2**20:.2f} MiB "
            f"({result['kv_ratio']:.1%}) · prefill {result['prefill_seconds']:.2f} s · "
            f"decode {result['decode_seconds']:.2f} s{_replayed(result)}[/]"
        )

    def context_kv(self, result: dict) -> None:
        """Where the context's keys and values came from, with a folder of saved contexts."""
        if "context_kv" in result and not self.as_json:
            kv = result["context_kv"]
            how = "read from" if kv["loaded"] else "computed and saved in"
            self.console.print(f"[dim]the context's keys and values were {how} {escape(kv['folder'])}[/]")

    def _head(self, i: int) -> None:
        if self.headers:
            self.console.print(f"[bold]question:[/] {escape(self.questions[i])}")

    def _end_line(self) -> None:
        if self.current is not None:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self.current = None


def _replayed(result: dict) -> str:
    """How many decode steps a CUDA graph replayed, when any did (older records lack the field)."""
    steps = result.get("replayed_steps", 0)
    return f" ({steps} of {result['new_tokens']} steps replayed from a CUDA graph)" if steps else ""
