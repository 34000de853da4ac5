"""A vLLM client that stopped reading its engine's outputs fails the call loudly, never hangs.

No engine: `scoring.checked_call` is driven with a stand-in client whose output reader
(`output_queue_thread`) is dead, or dies while a call waits.
"""

from __future__ import annotations

import queue
import threading
import time
from types import SimpleNamespace

import pytest

from fastpath.engine import scoring

DECODE_ERROR = TypeError("VLLM_ALLOW_INSECURE_SERIALIZATION must be set to use custom "
                         "utility result types")


def stand_in(reader: threading.Thread, queued=()) -> SimpleNamespace:
    outputs = queue.Queue()
    for item in queued:
        outputs.put(item)
    client = SimpleNamespace(output_queue_thread=reader, outputs_queue=outputs)
    return SimpleNamespace(llm_engine=SimpleNamespace(engine_core=client))


def finished_thread() -> threading.Thread:
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()
    return thread


def test_a_dead_reader_fails_the_call_before_it_is_sent():
    sent = []
    llm = stand_in(finished_thread(), [DECODE_ERROR])
    with pytest.raises(scoring.EngineClientStopped,
                       match="TypeError: VLLM_ALLOW_INSECURE_SERIALIZATION"):
        scoring.checked_call(llm, lambda **kw: sent.append(kw), tags=["scheduling"])
    assert sent == []


def test_a_reader_that_dies_while_the_call_waits_fails_it(monkeypatch):
    monkeypatch.setattr(scoring, "CLIENT_POLL_SECONDS", 0.05)
    stop = threading.Event()
    reader = threading.Thread(target=stop.wait)
    reader.start()
    llm = stand_in(reader)
    never = threading.Event()  # the reply that never comes
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    with pytest.raises(scoring.EngineClientStopped, match="no error recorded"):
        scoring.checked_call(llm, never.wait)
    assert time.monotonic() - started < 30


def test_a_live_reader_returns_the_result_and_the_error():
    stop = threading.Event()
    reader = threading.Thread(target=stop.wait)
    reader.start()
    try:
        llm = stand_in(reader)
        assert scoring.checked_call(llm, lambda x, y=0: x + y, 2, y=3) == 5
        with pytest.raises(ValueError, match="refused"):
            scoring.checked_call(llm, lambda: (_ for _ in ()).throw(ValueError("refused")))
    finally:
        stop.set()


def test_an_in_process_client_is_called_directly():
    llm = SimpleNamespace(llm_engine=SimpleNamespace(engine_core=SimpleNamespace()))
    assert scoring.checked_call(llm, threading.current_thread) is threading.current_thread()


@pytest.mark.parametrize("attribute", ["output_queue_thread", "outputs_queue"])
def test_the_installed_vllm_client_has_what_the_guard_reads(attribute):
    """The guard reads these defensively (absent, it calls straight through): the installed
    vLLM's multiprocess client must still define them, or the guard would quietly vanish."""
    import importlib.util
    from pathlib import Path

    from fastpath.source_text import decode, has_attribute

    origin = importlib.util.find_spec("vllm.v1.engine.core_client").origin
    assert has_attribute(decode(Path(origin).read_bytes()), "SyncMPClient", attribute)
