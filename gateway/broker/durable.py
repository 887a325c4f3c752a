"""The embedded durable engine: the memory engine, written through to a SQLite file.

It *is* the memory engine (same structures, same offsets, caps, expiry and
owner rules: one implementation of the semantics), plus persistence:

- every change the memory engine reports (`_changed`, `_owner_changed`) marks
  a channel or owner dirty; once per loop turn the dirty ones are written in
  one transaction on a single writer thread (group commit: a publish burst is
  one transaction, and while one commit is on the disk the next batch grows);
- a publication reaches subscribers (`_fan_in`) and its publisher (`publish`
  returns) only after its transaction committed, and a read waits for the
  commit of what it saw, so no client ever holds an offset a restart would
  not have: after a restart (graceful or SIGKILL) a client resumes with
  `since` and gets `recovered: true` and every publication;
- at start the file is read back into the memory engine's structures.

If the disk fails (full, read-only) the engine turns not ready, publishes
get `unavailable` (outcome unknown: the publication is held and retried,
not dropped), and the batch is retried every `RETRY_SECONDS` until it
commits; subscribers then receive the held publications in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gateway.broker.base import PublishItem
from gateway.broker.memory import IDEMPOTENCY_TTL, MAX_CHANNELS, MemoryBroker, _Stream
from gateway.broker.store import Batch, Store
from gateway.protocol import wire
from gateway.protocol.channels import Namespace
from gateway.protocol.errors import BrokerUnavailable, ProtocolError
from gateway.protocol.publication import History, Publication, Snapshot

log = logging.getLogger("herald.durable")

RETRY_SECONDS = 1.0

# What a channel looks like on disk: (epoch, offset, first history offset kept).
_Saved = tuple[str, int, int]


class DurableBroker(MemoryBroker):
    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "normal",
        clock: Callable[[], float] = time.time,
        max_channels: int = MAX_CHANNELS,
        idempotency_ttl: float = IDEMPOTENCY_TTL,
    ) -> None:
        super().__init__(clock=clock, max_channels=max_channels, idempotency_ttl=idempotency_ttl)
        self.path = path
        self._store = Store(path, synchronous)
        self._writer: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._saved: dict[str, _Saved] = {}
        self._dirty: set[str] = set()
        self._dirty_owners: set[str] = set()
        self._new_keys: list[tuple[str, str, str, int, float]] = []  # idempotency keys applied
        self._deliveries: list[Publication] = []  # published, waiting for their commit
        # Resolved (with None, or the error) when what is dirty now has committed.
        self._next: asyncio.Future[BaseException | None] | None = None
        self._inflight: asyncio.Future[BaseException | None] | None = None
        self._failure: BaseException | None = None
        self._open = False
        self.commits = 0
        self.store_errors = 0

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="herald-store")
        try:
            await self._loop.run_in_executor(self._writer, self._store.open)
            loaded = await self._loop.run_in_executor(
                self._writer, self._store.load, self._clock()
            )
        except BaseException:
            self._writer.shutdown(wait=False)
            self._writer = None
            raise
        for channel, row in loaded.streams.items():
            history = deque(Publication.from_record(rec) for rec in row.records)
            self._streams[channel] = _Stream(
                row.epoch, row.offset, row.expires, history, row.state
            )
            first = history[0].offset if history else row.offset + 1
            self._saved[channel] = (row.epoch, row.offset, first)
        self._owners.update(loaded.owners)
        for channel, key, epoch, offset, expires in loaded.keys:
            self._applied[(channel, key)] = (epoch, offset, expires)
        self._open = True
        log.info("durable store %s: %d channels, %d owners restored",
                 self.path, len(loaded.streams), len(loaded.owners))

    async def close(self) -> None:
        if self._writer is None or self._loop is None:
            return
        if self._failure is None:
            await self._settled()
        else:
            log.error("durable store %s: closing with unwritten changes (%s)",
                      self.path, self._failure)
        await self._loop.run_in_executor(self._writer, self._store.close)
        self._writer.shutdown(wait=True)
        self._writer = None
        self._open = False

    @property
    def ready(self) -> bool:
        return self._open and self._failure is None

    # -- the stream: memory semantics, then the commit --------------------------

    async def publish(
        self,
        namespace: Namespace,
        channel: str,
        event: str,
        data: Any,
        *,
        owner: str | None = None,
        meta: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Publication:
        if self._failure is not None:
            # Refuse before changing anything, so a failing disk holds a bounded backlog.
            raise BrokerUnavailable(f"durable store cannot write: {self._failure}")
        pub = await super().publish(namespace, channel, event, data, owner=owner, meta=meta,
                                    idempotency_key=idempotency_key)
        await self._settled(raise_error=True)
        return pub

    async def publish_many(
        self, items: Sequence[PublishItem]
    ) -> list[Publication | ProtocolError | BrokerUnavailable]:
        """The whole batch into memory, then one commit for all of it (not one per item)."""
        if self._failure is not None:
            return [BrokerUnavailable(f"durable store cannot write: {self._failure}")] * len(items)
        results: list[Publication | ProtocolError | BrokerUnavailable] = []
        for it in items:
            try:
                results.append(await MemoryBroker.publish(
                    self, it.namespace, it.channel, it.event, it.data, owner=it.owner,
                    meta=it.meta, idempotency_key=it.idempotency_key,
                ))
            except ProtocolError as exc:
                results.append(exc)
        try:
            await self._settled(raise_error=True)
        except BrokerUnavailable as exc:
            return [exc if isinstance(r, Publication) else r for r in results]
        return results

    async def history(
        self, namespace: Namespace, channel: str, since: int | None, limit: int
    ) -> History:
        result = await super().history(namespace, channel, since, limit)
        await self._settled(raise_error=True)  # nothing read that a restart would not have
        return result

    async def snapshot(self, namespace: Namespace, channel: str) -> Snapshot:
        result = await super().snapshot(namespace, channel)
        await self._settled(raise_error=True)
        return result

    async def register_owner(self, channel: str, owner: str) -> None:
        await super().register_owner(channel, owner)
        await self._settled(raise_error=True)

    # -- write-through ------------------------------------------------------------

    def _changed(self, channel: str) -> None:
        self._dirty.add(channel)
        self._schedule()

    def _owner_changed(self, channel: str) -> None:
        self._dirty_owners.add(channel)
        self._schedule()

    def _remember(self, channel: str, key: str, epoch: str, offset: int, now: float) -> None:
        super()._remember(channel, key, epoch, offset, now)
        # Kept on disk too: a retry after a restart must still find the key.
        self._new_keys.append((channel, key, epoch, offset, now + self._idempotency_ttl))

    def _fan_in(self, pub: Publication) -> None:
        self._deliveries.append(pub)  # handed to the node once its batch committed

    def _schedule(self) -> None:
        if self._next is None and self._loop is not None:
            self._next = self._loop.create_future()
            if self._inflight is None and self._failure is None:
                self._loop.call_soon(self._flush)

    async def _settled(self, raise_error: bool = False) -> None:
        """Wait until everything changed so far is on disk (or failed to get there)."""
        waiting = self._next or self._inflight
        if waiting is None:
            return
        error = await asyncio.shield(waiting)
        if error is not None and raise_error:
            raise BrokerUnavailable(f"durable store cannot write: {error}")

    def _flush(self) -> None:
        if self._inflight is not None or self._next is None:
            return
        assert self._loop is not None and self._writer is not None
        deliveries, self._deliveries = self._deliveries, []
        done, self._next = self._next, None
        self._inflight = done
        dirty, dirty_owners = set(self._dirty), set(self._dirty_owners)
        try:
            batch, saved = self._collect()
        except Exception as exc:  # a row that cannot be encoded: fail loudly, lose nothing
            log.exception("durable store %s: cannot encode a batch", self.path)
            self._dirty |= dirty
            self._dirty_owners |= dirty_owners
            self._failed(exc, deliveries, done)
            return
        write = self._loop.run_in_executor(self._writer, self._store.write, batch)
        write.add_done_callback(lambda f: self._written(f, batch, saved, deliveries, done))

    def _collect(self) -> tuple[Batch, dict[str, _Saved | None]]:
        """The dirty channels and owners as rows, read from memory on the loop."""
        batch = Batch()
        saved: dict[str, _Saved | None] = {}
        for channel in self._dirty:
            stream = self._streams.get(channel)
            old = self._saved.get(channel)
            if stream is None:
                if old is not None:
                    batch.streams[channel] = None
                    batch.cleared.append(channel)
                    saved[channel] = None
                continue
            history = stream.history
            first = history[0].offset if history else stream.offset + 1
            after = 0
            if old is None or old[0] != stream.epoch:
                if old is not None:
                    batch.cleared.append(channel)  # a new epoch: the old history is gone
            else:
                after = old[1]
                if first > old[2]:
                    batch.trims.append((channel, first))
            new = []
            for pub in reversed(history):
                if pub.offset <= after:
                    break
                new.append((channel, pub.offset, wire.encode(pub.to_record())))
            batch.rows.extend(reversed(new))
            batch.streams[channel] = (
                stream.epoch, stream.offset, stream.expires, wire.encode(stream.state)
            )
            saved[channel] = (stream.epoch, stream.offset, first)
        self._dirty.clear()
        for channel in self._dirty_owners:
            batch.owners[channel] = self._owners.get(channel)
        self._dirty_owners.clear()
        batch.keys, self._new_keys = self._new_keys, []
        return batch, saved

    def _written(
        self,
        write: asyncio.Future[None],
        batch: Batch,
        saved: dict[str, _Saved | None],
        deliveries: list[Publication],
        done: asyncio.Future[BaseException | None],
    ) -> None:
        self._inflight = None
        error = write.exception()
        if error is None:
            self.commits += 1
            for channel, position in saved.items():
                if position is None:
                    self._saved.pop(channel, None)
                else:
                    self._saved[channel] = position
            if self._failure is not None:
                log.warning("durable store %s: writing again", self.path)
                self._failure = None
            for pub in deliveries:
                super()._fan_in(pub)
            done.set_result(None)
            if self._next is not None:
                self._flush()  # what arrived while this batch was on the disk
            return
        # Nothing of the batch is on disk: mark it all dirty again, keep the deliveries first.
        self._dirty.update(batch.streams)
        self._dirty_owners.update(batch.owners)
        self._failed(error, deliveries, done)

    def _failed(
        self,
        error: BaseException,
        deliveries: list[Publication],
        done: asyncio.Future[BaseException | None],
    ) -> None:
        self._inflight = None
        self.store_errors += 1
        if self._failure is None:
            log.error("durable store %s: write failed, retrying every %.0fs: %s",
                      self.path, RETRY_SECONDS, error)
        self._failure = error
        self._deliveries[:0] = deliveries
        done.set_result(error)
        assert self._loop is not None
        self._loop.call_later(RETRY_SECONDS, self._retry)

    def _retry(self) -> None:
        if self._writer is None:
            return
        if self._next is None:
            assert self._loop is not None
            self._next = self._loop.create_future()
        self._flush()
