"""The device agent, run as on a target: in its own virtual environment with only onnxruntime and numpy (no torch),
on localhost. It measures what it is sent and refuses garbage, oversize models and wrong tokens with a clear
error while staying up."""

import http.client
import json
import subprocess
import threading

import pytest

from .conftest import ROOT

TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def agent(device_python, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("agent") / "token"
    token_file.write_text(TOKEN + "\n")
    proc = subprocess.Popen([device_python, "-m", "exporters.agent", "--port", "0", "--token-file", str(token_file),
                             "--max-mb", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    hello = json.loads(proc.stdout.readline())
    yield proc, int(hello["listening"].rsplit(":", 1)[1]), hello
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory):
    import torch

    from exporters.onnx_export import export_onnx

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval()
    return export_onnx(net, (3, 32, 32), tmp_path_factory.mktemp("m") / "m.onnx").read_bytes()


def request(port, method, path, body=b"", token=TOKEN, length=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.putrequest(method, path)
    if token is not None:
        conn.putheader("Authorization", f"Bearer {token}")
    conn.putheader("Content-Length", str(len(body) if length is None else length))
    conn.endheaders()
    if length is None:
        conn.send(body)
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    return response.status, data


def test_the_agent_measures_a_model_and_describes_its_device(agent, model_bytes):
    proc, port, hello = agent
    assert request(port, "GET", "/health") == (200, {"status": "ok"})
    status, result = request(port, "POST", "/measure?threads=1&batch=2&runs=30&warmup=3", model_bytes)
    assert status == 200, result
    assert 0 < result["p50_ms"] <= result["p90_ms"] and result["batch"] == 2 and result["runs"] == 30
    assert result["input_shape"] == [2, 3, 32, 32] and result["device"]["onnxruntime"] == hello["onnxruntime"]
    assert "CPUExecutionProvider" in result["device"]["providers"] and result["device"]["cores"] >= 1


@pytest.mark.parametrize(("path", "body", "token", "length", "status", "says"), [
    ("/measure", b"MODEL", "wrong-token-0123456789", None, 401, "token"),
    ("/measure", b"MODEL", None, None, 401, "token"),
    ("/measure", b"this is not an onnx model", TOKEN, None, 422, "cannot measure this model"),
    ("/measure", b"", TOKEN, 5_000_000, 413, "at most 1,000,000"),
    ("/measure?threads=0", b"MODEL", TOKEN, None, 400, "threads must be between 1 and 256"),
    ("/measure?runs=many", b"MODEL", TOKEN, None, 400, "runs must be an integer"),
    ("/measure?colour=red", b"MODEL", TOKEN, None, 400, "unknown setting 'colour'"),
    ("/elsewhere", b"MODEL", TOKEN, None, 404, "no such path"),
])
def test_bad_requests_are_refused_with_a_reason_and_the_agent_stays_up(agent, model_bytes, path, body, token,
                                                                       length, status, says):
    proc, port, _ = agent
    body = model_bytes if body == b"MODEL" else body
    got, answer = request(port, "POST", path, body, token, length)
    assert got == status and says in answer["error"], answer
    assert proc.poll() is None and request(port, "GET", "/health") == (200, {"status": "ok"})


def test_models_sent_together_are_measured_one_at_a_time(agent, model_bytes):
    proc, port, _ = agent
    results = []
    threads = [threading.Thread(target=lambda: results.append(request(port, "POST", "/measure?runs=200", model_bytes)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [status for status, _ in results] == [200, 200, 200]
    windows = sorted(answer["window"] for _, answer in results)
    assert all(a[1] <= b[0] for a, b in zip(windows, windows[1:], strict=False))  # never two at once


def test_a_short_token_is_refused_at_start(device_python, tmp_path):
    (tmp_path / "token").write_text("short\n")
    proc = subprocess.run([device_python, "-m", "exporters.agent", "--port", "0", "--token-file", str(tmp_path / "token")],
                          capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)}, timeout=60)
    assert proc.returncode == 2 and "at least 16 characters" in proc.stderr
