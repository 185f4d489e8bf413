"""A batch's progress, as a person reads it: one line at most every few seconds, and a summary.

    songs 12/20 (1 failed) | 412 s of audio in 35 s: 11.8x real time | ETA 23 s
"""
import sys
import time
import typing as tp


def duration(seconds: float) -> str:
    """`seconds` as 42 s, 3 min 05 s or 2 h 07 min."""
    seconds = round(max(0., seconds))  # 239.6 s: 4 min 00 s, not 3 min 60 s
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:02.0f} min"


class Progress:
    """Counts the songs of one run as their rows arrive (`song`); `line` and `summary` say
    where it stands. `total`: songs in INPUT; `skipped`: those done before this run."""

    def __init__(self, total: int, skipped: int, out: tp.TextIO = sys.stderr,
                 every_s: float = 2.):
        self.total, self.skipped, self.out, self.every_s = total, skipped, out, every_s
        self.done = self.failed = 0
        self.audio_seconds = 0.
        self.start, self.started_at = time.monotonic(), time.time()
        self.setup_seconds: tp.Optional[float] = None  # until the pipeline could start
        self.actors, self.device = 0, ""
        self.model_seconds = 0.  # the model actors' forwards, all songs
        # the first separated song's end (its actor's clock) and the model seconds after it,
        # the last song's end: `model_busy_after_first_song`
        self._first_end: tp.Optional[float] = None
        self._last_end, self._model_after_first = 0., 0.
        self._printed = 0.

    @property
    def to_run(self) -> int:
        return self.total - self.skipped

    def pipeline_started(self, actors: int, device: str = "cpu", windows: int = 1) -> None:
        """Ray is up: what follows is the pipeline's, with `actors` model actors on `device`
        (cpu, cuda: the one chosen on the cluster) running `windows` windows per forward;
        said in a line."""
        self.setup_seconds = time.monotonic() - self.start
        self.actors, self.device = actors, device
        print(f"batch: {self.to_run} songs to run on {actors} model actor(s), {device}, "
              f"{windows} window(s) per forward", file=self.out, flush=True)

    @property
    def model_busy(self) -> tp.Optional[float]:
        """The share of the pipeline's time the model actors spent in forwards (0-1)."""
        if self.setup_seconds is None or not self.actors:
            return None
        seconds = time.monotonic() - self.start - self.setup_seconds
        return self.model_seconds / (self.actors * seconds) if seconds > 0 else None

    @property
    def model_busy_after_first_song(self) -> tp.Optional[float]:
        """The same share from the first separated song's end to the last's, by the actors'
        clocks (the songs' `finished_at`; a row's `model_seconds` are its actor's forwards
        since its previous song ended): what a long run tends to, without the actors' start
        (the model's loading, CUDA's) and the pipeline's filling (0-1; None until a second
        song was separated)."""
        if self._first_end is None or not self.actors or self._last_end <= self._first_end:
            return None
        return self._model_after_first / (self.actors * (self._last_end - self._first_end))

    def song(self, row: dict) -> None:
        """One song's row came back; prints a line when `every_s` has passed since the last."""
        self.model_seconds += float(row.get("model_seconds") or 0.)
        if row["status"] == "done":
            self._ended(float(row["finished_at"]), float(row.get("model_seconds") or 0.))
            self.done += 1
            self.audio_seconds += float(row["audio_seconds"] or 0.)
        else:
            self.failed += 1
        now = time.monotonic()
        if now - self._printed >= self.every_s or self.done + self.failed == self.to_run:
            self._printed = now
            print(self.line(), file=self.out, flush=True)

    def _ended(self, finished_at: float, model_seconds: float) -> None:
        """A separated song's end, by its actor's clock, and the forwards that led to it."""
        if self._first_end is None:
            self._first_end = self._last_end = finished_at
        elif finished_at > self._first_end:
            self._model_after_first += model_seconds
            self._last_end = max(self._last_end, finished_at)

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        finished = self.done + self.failed
        parts = [f"songs {self.skipped + finished}/{self.total}"
                 + (f" ({self.failed} failed)" if self.failed else "")]
        if elapsed > 0 and self.audio_seconds:
            parts.append(f"{self.audio_seconds:.0f} s of audio in {duration(elapsed)}: "
                         f"{self.audio_seconds / elapsed:.1f}x real time")
        if finished and finished < self.to_run:
            parts.append(f"ETA {duration(elapsed / finished * (self.to_run - finished))}")
        return " | ".join(parts)

    def summary(self, manifest: str) -> str:
        elapsed = time.monotonic() - self.start
        speed = (f", {self.audio_seconds / elapsed:.1f}x real time"
                 if elapsed > 0 and self.audio_seconds else "")
        setup = (f" (Ray's start: {duration(self.setup_seconds)})"
                 if self.setup_seconds is not None else "")
        busy = self.model_busy
        speed += f", model busy {busy:.0%}" if busy is not None else ""
        return (f"batch: {self.done} separated, {self.failed} failed, {self.skipped} done "
                f"before; {self.audio_seconds:.0f} s of audio in {duration(elapsed)}{setup}"
                f"{speed}; manifest: {manifest}")

    def stopped(self, reason: str) -> str:
        """What a run stopped before its end says: why, and what it did until then."""
        return (f"batch stopped ({reason}) after {duration(time.monotonic() - self.start)}: "
                f"{self.done} separated, {self.failed} failed, {self.skipped} done before, of "
                f"{self.total} (songs finishing as it stopped may be recorded too); the same "
                f"command again goes on from the songs recorded")

    def record(self) -> dict:
        """This run as `_batch/runs/` keeps it: seconds from its start, of which Ray's start
        and what came before it (`setup_seconds`: None when nothing was left to run), the
        model actors and their device, the model's forward seconds and its busy share of the
        pipeline's time per actor (and of the time from the first song's end to the last's)."""
        return {"started_at": self.started_at, "seconds": time.monotonic() - self.start,
                "setup_seconds": self.setup_seconds, "actors": self.actors,
                "device": self.device,
                "model_seconds": self.model_seconds, "model_busy": self.model_busy,
                "model_busy_after_first_song": self.model_busy_after_first_song,
                "songs": self.total,
                "done_before": self.skipped, "separated": self.done, "failed": self.failed,
                "audio_seconds": self.audio_seconds}
