"""Starting the real listener: start_multi_address on a free port (plain and TLS), the printed URL, and
the live log stream to subscribed WebSocket clients."""
# Fixtures are shared by importing them by name, which ruff reads as redefinitions:
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import logging
import shutil
import ssl
import subprocess

import aiohttp
import pytest

from tests.test_server_common import make_queue, receive_json_until, server_args, srv, test_nodes  # noqa: F401

pytestmark = pytest.mark.asyncio


async def _started(server_args, caplog):
    import server as server_module

    s = server_module.PromptServer(asyncio.get_running_loop())
    s.prompt_queue = make_queue(s)
    s.add_routes()
    await s.setup()
    with caplog.at_level(logging.INFO):
        await s.start_multi_address([("127.0.0.1", 0)])
    return s


async def test_start_multi_address_serves_and_logs_url(base_dir, server_args, test_nodes, caplog):
    s = await _started(server_args, caplog)
    try:
        (address, port), = s.bound
        assert address == "127.0.0.1" and port > 0
        assert f"http://127.0.0.1:{port}" in caplog.text
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/api/prompt") as r:
                assert r.status == 200 and await r.json() == {"exec_info": {"queue_remaining": 0}}
    finally:
        await s.runner.cleanup()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
async def test_tls_flags(base_dir, server_args, test_nodes, caplog, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
    server_args.tls_keyfile, server_args.tls_certfile = str(key), str(cert)
    try:
        s = await _started(server_args, caplog)
    finally:
        server_args.tls_keyfile = server_args.tls_certfile = None
    try:
        port = s.bound[0][1]
        assert f"https://127.0.0.1:{port}" in caplog.text
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.check_hostname = False
        async with aiohttp.ClientSession() as session:
            async with session.get(f"https://127.0.0.1:{port}/api/features", ssl=ctx) as r:
                assert r.status == 200 and (await r.json())["supports_preview_metadata"] is True
    finally:
        await s.runner.cleanup()


async def test_tls_needs_both_files(base_dir, server_args, test_nodes, caplog):
    server_args.tls_keyfile = "/tmp/only-a-key.pem"
    try:
        with pytest.raises(RuntimeError, match="--tls-certfile"):
            await _started(server_args, caplog)
    finally:
        server_args.tls_keyfile = None


async def test_log_subscription_streams_logs(srv):
    server, client = srv
    ws = await client.ws_connect("/ws?clientId=logger")
    await ws.receive_json(timeout=5)
    r = await client.patch("/internal/logs/subscribe", json={"clientId": "logger", "enabled": True})
    assert r.status == 200
    logging.getLogger("taco.test").warning("streamed-line")
    got = await receive_json_until(ws, "logs")
    entries = got[-1]["data"]["entries"]
    assert any("streamed-line" in e["m"] for e in entries) and "cols" in got[-1]["data"]["size"]
    await client.patch("/internal/logs/subscribe", json={"clientId": "logger", "enabled": False})
    assert "logger" not in server.log_subscribers
    assert (await client.patch("/internal/logs/subscribe", json={"enabled": True})).status == 400
    await ws.close()
