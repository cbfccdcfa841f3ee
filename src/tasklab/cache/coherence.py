"""Coherence and recovery for ``TieredCache``: the invalidation channel's notices, trusting
L1 only while it is subscribed, dropping suspect entries and replaying failed writes as
deletes when Redis is back, and a fresh state in forked children."""

from __future__ import annotations

import functools
import logging
import os
import weakref
from typing import TYPE_CHECKING

from tasklab.cache.backends.memory import MemoryBackend
from tasklab.cache.errors import L2Unavailable
from tasklab.cache.invalidation import InvalidationListener, Notice, encode_clear, encode_notice

if TYPE_CHECKING:
    from tasklab.cache.tiered import TieredCache

logger = logging.getLogger("tasklab.cache")


def start_listener(cache: TieredCache) -> None:
    with cache._listener_lock:
        if cache._closed or cache._listener is not None:
            return
        cache._listener = InvalidationListener(
            cache._redis_url,
            cache=cache.name,
            sender=cache._sender,
            on_notice=functools.partial(on_notice, cache),
            on_connected=functools.partial(on_connected, cache),
            on_lost=functools.partial(on_lost, cache),
        )
        cache._listener.start()


def on_notice(cache: TieredCache, notice: Notice) -> None:
    cache.counters.invalidation()
    if cache.l1 is None:
        return
    if notice.keys is None:
        cache.l1.clear()
    else:
        cache.l1.delete_many(notice.keys)


def on_connected(cache: TieredCache, reconnected: bool) -> None:
    if reconnected:
        logger.warning("cache %r: invalidation channel is back; L1 in use again", cache.name)
    if cache.l2 is not None:
        cache.l2.mark_reachable()  # the SUBSCRIBE just answered: close an open circuit
    replay_pending(cache)
    if cache.l1 is not None:
        cache.l1.clear()  # anything in it was stored while notices could be missed
    cache._coherent = True
    cache._coherent_event.set()


def on_lost(cache: TieredCache, error: BaseException) -> None:
    if cache._closed:
        return
    was_coherent, cache._coherent = cache._coherent, False
    cache._coherent_event.clear()
    # Only a trusted L1 holds entries that missed notices could make stale; before the
    # first subscription it holds at most suspect entries, dropped when Redis is back.
    dropped = cache.l1.clear() if cache.l1 is not None and was_coherent else 0
    logger.warning(
        "cache %r: invalidation channel down (%s); cleared %d L1 entries, L1 is "
        "bypassed until it reconnects",
        cache.name,
        error,
        dropped,
    )


def l2_recovered(cache: TieredCache) -> None:
    """First Redis success after failures: drop suspect L1 entries, replay failed writes."""
    if cache.l1 is not None:
        cache.l1.drop_suspect()
    replay_pending(cache)


def replay_pending(cache: TieredCache) -> None:
    if cache.l2 is None or not len(cache._pending):
        return
    keys, tags, everything = cache._pending.take()
    try:
        if everything:
            cache.l2.clear(notice=encode_clear(cache._sender))
        elif keys:
            ordered = sorted(keys)
            cache.l2.delete(
                ordered, notice=encode_notice(cache._sender, ordered), **cache._tombstone()
            )
        for tag in () if everything else tags:
            cache.l2.delete_tag(tag, sender=cache._sender, **cache._tombstone())
    except L2Unavailable:
        cache._pending.add(keys, tags, everything)
        return
    logger.info(
        "cache %r: replayed %s failed writes as deletes",
        cache.name,
        "all" if everything else len(keys) + len(tags),
    )


def reset_after_fork(cache: TieredCache) -> None:
    if cache.l1 is not None:
        cache.l1 = MemoryBackend(max_entries=cache.l1.max_entries, name=cache.name)
    if cache.l2 is not None:
        cache.l2.reset_after_fork()
    cache.counters.reset_after_fork()
    # No thread may start inside a fork handler: the listener starts on first use.
    cache._init_process_state(start_listener=False)


def reset_in_forked_children(cache: TieredCache) -> None:
    """A forked child (Celery prefork, gunicorn --preload) gets its own L1, identity and
    listener; without this it would inherit an L1 nobody keeps coherent."""
    ref = weakref.ref(cache)

    def reset() -> None:
        instance = ref()
        if instance is not None:
            reset_after_fork(instance)

    os.register_at_fork(after_in_child=reset)
