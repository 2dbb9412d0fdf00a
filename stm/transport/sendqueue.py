"""The bounded queue between a caller and a sender thread (TCP, WebSocket): when it is full,
``block`` waits for room (nothing lost) and ``drop-oldest`` drops and counts the oldest."""

from __future__ import annotations


class QueueingSender:
    """What TcpSender and WsSender share: they own ``_queue`` (a deque), ``queue_limit``,
    ``policy``, the ``_nonempty`` and ``_room`` conditions of one lock, ``_closing`` and
    ``_finished`` flags, and the ``dropped`` and ``undelivered`` counters."""

    def _enqueue(self, messages: list[bytes], wait: float) -> bool:
        """Queue ``messages`` (the lock held), waking the thread as the queue fills; False
        if a close while it waited for room left the rest undelivered."""
        block = self.policy == "block"
        queue = self._queue
        for i, message in enumerate(messages):
            if type(message) is not bytes:
                message = bytes(message)
            while len(queue) >= self.queue_limit:
                if not block:
                    queue.popleft()
                    self.dropped += 1
                    break
                if self._closing or self._finished:
                    # close() from another thread while we waited: nobody will send these
                    self.undelivered += len(messages) - i
                    return False
                self._nonempty.notify()
                self._room.wait(wait)
            queue.append(message)
            if len(queue) == 1:
                self._nonempty.notify()
        return True
