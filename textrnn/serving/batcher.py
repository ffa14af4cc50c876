"""The dynamic batcher: one sampling loop per model that steps every active stream as one batch.

A stream is one completion (one choice of one request). It joins at the next step: its prompt is
primed with one forward pass and its state becomes a new row of the batch. It leaves when it is
done, cancelled (its client went away) or the server stops; the last row moves into its place,
so rows stay packed and the freed row is the next joiner's. Each stream keeps its own random
generator, so a seeded stream makes the same tokens alone or in a crowd, up to float rounding in
the batched matrix products. Text goes to the event loop in chunks (see ``Stream.chunk_seconds``).
HTTP lives in ``app.py``; the sampling rule itself is ``sampling._sample``.
"""

from __future__ import annotations

import asyncio
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ..sampling import (_GREEDY_BELOW, Sampler, _cut_at_stop, _make_safe, _penalize, _sample, _TextDecoder,
                        token_texts, top_tokens)

_DRAW_BLOCK = 256  # uniform numbers drawn from a stream's generator at once


@dataclass
class Settings:
    """One stream's sampling settings, already checked by the request model."""

    max_tokens: int  # tokens to sample at most
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None  # None: from os.urandom
    stop: list[str] = field(default_factory=list)  # strings that end the text (not included, as OpenAI does)
    logprobs: int | None = None  # None: none; N: each token's log-probability and the N most likely tokens


@dataclass
class Event:
    """What a stream hands to its reader: text, and at the end a finish reason or an error."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" at the end
    error: str | None = None  # the stream ended without finishing (the server is stopping)
    tokens: int = 0  # tokens sampled so far (with the last event: the completion's token count)
    logprobs: list[tuple] = field(default_factory=list)  # (token, logprob, top, offset) of the tokens whose text starts here


class Stream:
    """One completion being sampled: its settings, random generator, text decoder and outbox.

    The batcher thread writes; the event loop reads ``outbox`` (an asyncio queue). Text is held
    back and sent when ``chunk_seconds`` have passed since the last send, or at the end: one event
    per token would cost the event loop more than sampling costs the batcher (at 32 streams on 2
    cores, one event per token halves the chars/s; BENCHMARKS.md). The first text goes at once. The last
    ``len(longest stop) - 1`` characters are held back too, so that a stop string that is cut
    from the text was never sent.
    """

    def __init__(self, ids: list[int], settings: Settings, loop: asyncio.AbstractEventLoop,
                 outbox: asyncio.Queue, index: int, chunk_seconds: float):
        self.ids = ids
        self.settings = settings
        self.loop = loop
        self.outbox = outbox  # (index, Event) pairs, shared by the streams of one request
        self.index = index  # the choice's index in its request
        self.chunk_seconds = chunk_seconds
        self.cancelled = False  # set by the reader; the batcher drops the stream at its next step
        self.released = False  # its place in ``Slots`` is given back (once)
        self.generator = torch.Generator()
        seed = settings.seed if settings.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.generator.manual_seed(seed)
        self._draws: list[float] = []
        self.tokens = 0
        self.last_id = 0  # the token sampled last, the next step's input
        self.decoder: _TextDecoder | None = None
        self.keep = max((len(s) for s in settings.stop), default=0)
        self.recent = ""  # the last ``keep`` characters of the text, for stop strings across tokens
        self.pending = ""  # text made but not yet sent
        self.last_send = -math.inf  # the first text goes at once: chunking must not delay the first token
        self.entries: list[tuple] = []  # (token, logprob, top, offset in the text made) not yet sent
        self.made = 0  # characters made so far (before any stop string cut)
        self.sent = 0  # characters sent so far

    def note(self, token: str, logprob: float, top: dict[str, float], piece: str) -> None:
        """Record a sampled token's log-probability; its text ``piece`` starts at the text made so far."""
        self.entries.append((token, logprob, top, self.made))
        self.made += len(piece)

    def _sending(self, text: str) -> list[tuple]:
        """The entries of the tokens whose text starts within what is sent so far, with ``text``."""
        self.sent += len(text)
        count = 0
        while count < len(self.entries) and self.entries[count][3] < self.sent:
            count += 1
        taken, self.entries = self.entries[:count], self.entries[count:]
        return taken

    def next_draw(self) -> float:
        """The next uniform number in (0, 1] of this stream's own generator."""
        if not self._draws:
            self._draws = (1.0 - torch.rand(_DRAW_BLOCK, generator=self.generator)).tolist()[::-1]
        return self._draws.pop()

    def take(self, piece: str) -> bool:
        """Add decoded text; True when a stop string ended the stream (the stop string is dropped)."""
        if not self.keep:
            self.pending += piece
            return False
        piece, stopped = _cut_at_stop(self.recent, piece, self.settings.stop)
        self.recent = (self.recent + piece)[-self.keep:]
        self.pending += piece
        if stopped:
            matched = max((s for s in self.settings.stop if self.recent.endswith(s)), key=len)
            self.pending = self.pending[:-len(matched)]
        return stopped

    def outgoing(self, now: float, final: Event | None = None) -> Event | None:
        """The event to send now, if any: due text, or everything with ``final``."""
        if final is not None:
            final.text, final.tokens, self.pending = self.pending, self.tokens, ""
            final.logprobs, self.entries = self._sending(final.text), []
            return final
        hold = self.keep - 1 if self.keep else 0
        ready = len(self.pending) - hold
        if ready <= 0 or now - self.last_send < self.chunk_seconds:
            return None
        text, self.pending = self.pending[:ready], self.pending[ready:]
        self.last_send = now
        return Event(text=text, tokens=self.tokens, logprobs=self._sending(text))


class Busy(Exception):
    """More streams than the server allows at once."""


class Slots:
    """The count of streams open across all models, against the configured limit."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def acquire(self, count: int) -> None:
        with self._lock:
            if self.used + count > self.limit:
                raise Busy(f"{self.used} of {self.limit} concurrent streams are in use; {count} more asked for")
            self.used += count

    def release(self, stream: Stream) -> None:
        with self._lock:
            if not stream.released:
                stream.released = True
                self.used -= 1


class Batcher:
    """The sampling loop of one model, on its own thread.

    ``submit`` hands streams over (from the event loop); the loop primes them, then steps all
    active streams together until each is done. ``stop`` ends every stream with an error event
    and joins the thread.
    """

    def __init__(self, sampler: Sampler, slots: Slots, threads: int | None = None):
        self.sampler = sampler
        self.slots = slots
        self.threads = threads
        self.device = sampler.device
        tokenizer = sampler.tokenizer
        vocab = tokenizer.vocab_size
        unk = getattr(tokenizer, "unk_id", None)
        self.allowed = vocab - 1 if unk == vocab - 1 else vocab  # never sample a char model's unknown id
        self._incoming: queue.SimpleQueue[Stream] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="textrnn-batcher", daemon=True)
        self.active = 0  # streams in the batch now (read by /health)
        self.steps = 0  # batch steps taken so far
        self._thread.start()

    def submit(self, stream: Stream) -> None:
        self._incoming.put(stream)
        self._wake.set()
        if self._stopping or not self._thread.is_alive():  # too late: the loop may have drained already
            self._finish_all([], "the server is shutting down")

    def request_stop(self) -> None:
        """Make the loop end every stream with an error event and exit (does not wait)."""
        self._stopping = True
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self.request_stop()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the loop (batcher thread)

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while not self._stopping:
            streams: list[Stream] = []
            try:
                self._loop(streams)
            except Exception as exc:  # noqa: BLE001 - a failed step ends its streams, never the server
                self._finish_all(streams, f"sampling failed: {type(exc).__name__}: {exc}")
        self._finish_all([], "the server is shutting down")

    def _loop(self, streams: list[Stream]) -> None:
        """Join, sample, step, send, until stopped; ``streams`` is the batch, in row order."""
        vocab = self.sampler.tokenizer.vocab_size
        logits = torch.zeros(0, vocab, device=self.device)  # (B, V): the next token's logits per row
        state: tuple[torch.Tensor, ...] = ()
        seen = torch.zeros(0, vocab, dtype=torch.bool, device=self.device)  # (B, V): ids so far, for the penalty
        step = self.sampler.model.stepper(self.sampler.precision)
        while True:
            if self._stopping:
                self._finish_all(streams, "the server is shutting down")
                streams.clear()
                return
            if not streams:
                self._wake.wait(0.5)
                self._wake.clear()
            joining = self._drain()
            if joining:
                with torch.inference_mode():
                    logits, state, seen = self._join(joining, streams, logits, state, seen)
            if not streams:
                continue
            with torch.inference_mode():
                keep, outgoing = self._sample_step(streams, logits, seen)
                if len(keep) < len(streams):  # some streams finished: pack the rows
                    rows = torch.tensor(keep, dtype=torch.long, device=self.device)
                    streams[:] = [streams[i] for i in keep]
                    logits, seen = logits[rows], seen[rows]
                    state = tuple(s.index_select(1, rows) for s in state)
                self.active = len(streams)
                if streams:
                    ids = torch.tensor([s.last_id for s in streams], dtype=torch.long, device=self.device)
                    logits, state = step(ids, state)  # (B, V), the new state: one step for every stream
                    self.steps += 1
            self._send(outgoing)

    def _drain(self) -> list[Stream]:
        joining = []
        while True:
            try:
                joining.append(self._incoming.get_nowait())
            except queue.Empty:
                return joining

    def _join(self, joining: list[Stream], streams: list[Stream], logits: torch.Tensor,
              state: tuple[torch.Tensor, ...], seen: torch.Tensor):
        """Prime each new stream (one forward pass over its prompt) and append it as a row."""
        new_logits, new_states, new_seen = [], [], []
        for stream in joining:
            if stream.cancelled:
                self.slots.release(stream)
                continue
            streams.append(stream)  # first: should priming fail, the stream is told
            first, primed = self.sampler._first_logits(stream.ids, 1)  # (1, V), state rows of batch 1
            row = torch.zeros(1, seen.shape[1], dtype=torch.bool, device=self.device)
            if stream.ids:
                row[0, torch.tensor(stream.ids, device=self.device)] = True
            stream.decoder = _TextDecoder(self.sampler.tokenizer)
            new_logits.append(first)
            new_states.append(primed)
            new_seen.append(row)
        if not new_logits:
            return logits, state, seen
        logits = torch.cat([logits, *new_logits])
        seen = torch.cat([seen, *new_seen])
        parts = [[s[i] for s in new_states] for i in range(len(new_states[0]))]
        state = tuple(torch.cat(([state[i]] if state else []) + parts[i], dim=1) for i in range(len(parts)))
        self.active = len(streams)
        return logits, state, seen

    def _sample_step(self, streams: list[Stream], logits: torch.Tensor, seen: torch.Tensor):
        """Pick every row's next token, hand out its text; the rows to keep and the events to send."""
        settings = [s.settings for s in streams]
        scored = [row for row, x in enumerate(settings) if x.logprobs is not None]
        log_probs = torch.log_softmax(logits[scored].float(), -1) if scored else None  # the model's own
        logits = logits[:, :self.allowed].float()  # (B, V')
        penalties = [x.repetition_penalty for x in settings]
        if any(p != 1.0 for p in penalties):
            logits = _penalize(logits, seen[:, :self.allowed], torch.tensor(penalties, device=self.device)[:, None])
        logits = _make_safe(logits)
        next_ids = self._pick(streams, settings, logits)  # (B,)
        seen.scatter_(1, next_ids[:, None], True)
        now = time.monotonic()
        keep, outgoing = [], []
        notes = self._logprobs(streams, scored, log_probs, next_ids) if scored else {}
        for row, (stream, token) in enumerate(zip(streams, next_ids.tolist())):
            if stream.cancelled:
                self.slots.release(stream)
                continue
            stream.tokens += 1
            stream.last_id = token
            piece = stream.decoder.push(token)
            if row in notes:
                stream.note(*notes[row], piece)
            stopped = stream.take(piece)
            final = None
            if stopped:
                final = Event(finish_reason="stop")
            elif stream.tokens >= stream.settings.max_tokens:  # the decoder's last whole characters may stop it too
                final = Event(finish_reason="stop" if stream.take(stream.decoder.flush()) else "length")
            event = stream.outgoing(now, final)
            if event is not None:
                outgoing.append((stream, event))
            if final is not None:
                self.slots.release(stream)
            else:
                keep.append(row)
        return keep, outgoing

    def _logprobs(self, streams: list[Stream], rows: list[int], log_probs: torch.Tensor,
                  next_ids: torch.Tensor) -> dict[int, tuple]:
        """{row: (token text, its log-probability, {top token: logprob})} for the rows that asked."""
        tokenizer = self.sampler.tokenizer
        picked = next_ids[rows]
        chosen = log_probs.gather(1, picked[:, None]).squeeze(1).tolist()
        most = max(streams[row].settings.logprobs for row in rows)
        tops = top_tokens(tokenizer, log_probs, most) if most else [{} for _ in rows]
        names = token_texts(tokenizer, picked.tolist())
        notes = {}
        for i, row in enumerate(rows):
            count = streams[row].settings.logprobs
            notes[row] = (names[i], chosen[i], dict(list(tops[i].items())[:count]))
        return notes

    @staticmethod
    def _pick(streams: list[Stream], settings: list[Settings], logits: torch.Tensor) -> torch.Tensor:
        """One id per row [B]: rows sharing (greedy, top_k, top_p) are sampled together.

        Temperature is applied per row before ``_sample`` (called with temperature 1), and the
        uniform number of each row comes from its own stream's generator.
        """
        groups: dict[tuple, list[int]] = {}
        for row, x in enumerate(settings):
            greedy = x.temperature < _GREEDY_BELOW
            key = (True, 0, 1.0) if greedy else (False, x.top_k, x.top_p)
            groups.setdefault(key, []).append(row)
        device = logits.device
        draws = torch.tensor([[1.0 if x.temperature < _GREEDY_BELOW else s.next_draw()]
                              for s, x in zip(streams, settings)], device=device)  # (B, 1)
        temperatures = torch.tensor([[x.temperature if x.temperature >= _GREEDY_BELOW else 1.0] for x in settings],
                                    device=device)  # (B, 1)
        if len(groups) == 1:
            (greedy, top_k, top_p), = groups
            if greedy:
                return logits.argmax(-1)
            scaled = logits / temperatures if bool((temperatures != 1.0).any()) else logits
            return _sample(scaled, 1.0, top_k, top_p, None, draws)
        ids = torch.empty(len(settings), dtype=torch.long, device=device)
        for (greedy, top_k, top_p), rows in groups.items():
            index = torch.tensor(rows, device=device)
            part = logits[index]
            if greedy:
                ids[index] = part.argmax(-1)
            else:
                ids[index] = _sample(part / temperatures[index], 1.0, top_k, top_p, None, draws[index])
        return ids

    @staticmethod
    def _send(outgoing: list[tuple[Stream, Event]]) -> None:
        """Hand events to their event loops: one wake-up per loop per step, not one per event."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Stream, Event]]] = {}
        for stream, event in outgoing:
            by_loop.setdefault(stream.loop, []).append((stream, event))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the event loop is closed: nobody is reading
                pass

    def _finish_all(self, streams: list[Stream], message: str) -> None:
        outgoing = []
        for stream in streams + self._drain():
            if not stream.cancelled and not stream.released:
                outgoing.append((stream, stream.outgoing(time.monotonic(), Event(error=message))))
            self.slots.release(stream)
        self.active = 0
        self._send(outgoing)


def _deliver(items: list[tuple[Stream, Event]]) -> None:
    for stream, event in items:
        stream.outbox.put_nowait((stream.index, event))

