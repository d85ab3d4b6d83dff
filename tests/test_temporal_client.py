"""``ditstream client stream --temporal/--motion-adaptive`` send the fields (issue 26)."""

from __future__ import annotations

import pytest
from ditstream.engine.null import null_runner
from ditstream.server.api.app import create_app
from ditstream.server.settings import Settings

from ditstream.bench.harness import ServerThread


@pytest.fixture(scope="module")
def server():
    with ServerThread(create_app(Settings(model="null", default_width=64, default_height=48), null_runner())) as srv:
        yield srv


def test_stream_command_sends_temporal_and_motion_adaptive(server):
    from typer.testing import CliRunner

    from ditstream.cli import app

    runner = CliRunner()
    base = ["client", "stream", "pattern", "--url", server.ws_url, "--frames", "4", "--fps", "30", "--in-flight", "1"]
    ok = runner.invoke(app, [*base, "--temporal", "0", "--motion-adaptive"])
    assert ok.exit_code == 0, ok.output
    assert "done: sent 4, received 4" in ok.output
    # the null backend cannot carry the memory: the server's refusal names it, so the flag reached it
    refused = runner.invoke(app, [*base, "--temporal", "0.5"])
    assert "temporal" in refused.output and "null backend" in refused.output, refused.output
