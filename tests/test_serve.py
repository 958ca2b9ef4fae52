"""ric serve: a live server on 127.0.0.1, called by the official openai client, raw HTTP and headless Chromium."""

import base64
import concurrent.futures
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

import ric

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``ric serve`` in a subprocess; its log is kept to count the batches it generated."""

    def __init__(self, model, tmp_path, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / f"serve-{self.port}.log"
        cmd = [sys.executable, "-m", "ric.cli", "serve", str(model), "--port", str(self.port), *map(str, args)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if get(f"{self.url}/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"server did not start: {self.log.read_text()[-3000:]}")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def request(url, data=None, method=None, headers=None):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def get(url):
    return request(url)


def post(url, body: bytes | dict):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return request(url, data, "POST", {"Content-Type": "application/json"})


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    s = Server(trained["ckpt"], tmp_path_factory.mktemp("serve"), "--score", "--max-batch-size", "16",
               "--batch-timeout", "0.5")  # fmt: skip
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def space(trained):
    return ric.load(trained["ckpt"]).reward_space


def test_openai_client_gets_a_steered_chat_completion(client, space):
    reply = client.chat.completions.create(
        model="ric", messages=[{"role": "user", "content": "how do I water a fern?"}], max_tokens=6,
        extra_body={"preference": [0.2, 0.8]},
    )  # fmt: skip
    assert reply.choices[0].message.role == "assistant" and isinstance(reply.choices[0].message.content, str)
    extra = reply.model_extra
    np.testing.assert_allclose(extra["desired_rewards"], space.desired([0.2, 0.8]))
    assert extra["preference"] == [0.2, 0.8] and set(extra["obtained_rewards"]) == {"verbosity", "readability"}
    assert reply.usage.completion_tokens > 0
    text = client.completions.create(model="ric", prompt="what is tea?", max_tokens=5,
                                      extra_body={"desired_rewards": [1.0, -0.5], "method": "p_norm"})  # fmt: skip
    assert isinstance(text.choices[0].text, str) and text.model_extra["desired_rewards"] == [1.0, -0.5]


def test_streaming_sends_each_token_as_it_is_sampled(client, space):
    chunks = list(client.chat.completions.create(
        model="ric", messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True,
        extra_body={"preference": [1.0, 0.0]}, stream_options={"include_usage": True},
    ))  # fmt: skip
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(pieces) > 1  # token by token, not one piece at the end
    last = chunks[-1]
    assert last.choices[0].finish_reason in ("stop", "length") and last.usage.completion_tokens <= 6
    np.testing.assert_allclose(last.model_extra["desired_rewards"], space.desired([1.0, 0.0]))
    assert all(c.id == chunks[0].id for c in chunks)


def test_a_request_joins_the_running_batch_and_a_seed_gives_steers_sample(client, trained):
    """A short request sent while a long one decodes is answered before the long one ends; a seeded request
    gets the sample ``steer`` gives with that seed."""
    long = client.completions.create(model="ric", prompt="tell me everything", max_tokens=300, stream=True,
                                     extra_body={"preference": [0.5, 0.5]})  # fmt: skip
    first = next(iter(long))
    short = client.completions.create(model="ric", prompt="and briefly?", max_tokens=4, seed=7, temperature=0.7,
                                      extra_body={"preference": [0.3, 0.7]})  # fmt: skip
    rest = list(long)
    assert first.choices[0].text is not None and short.choices[0].text is not None
    assert len([c for c in rest if c.choices and c.choices[0].text]) > 20  # the long one was still decoding
    assert short.model_extra["batch_size"] == 2
    steered = ric.load(trained["ckpt"]).steer("and briefly?", [0.3, 0.7], seed=7, max_new_tokens=4, temperature=0.7)
    assert short.choices[0].text == steered[0].sample


def test_concurrent_preferences_share_the_batch(client, space):
    weights = [[k / 15, 1 - k / 15] for k in range(16)]

    def ask(w):
        messages = [{"role": "user", "content": f"question {w[0]:.2f}"}]
        extra = {"preference": w}
        return client.chat.completions.create(model="ric", messages=messages, max_tokens=6, extra_body=extra)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, weights))
    for w, reply in zip(weights, replies):
        np.testing.assert_allclose(reply.model_extra["desired_rewards"], space.desired(w))
        assert reply.model_extra["preference"] == pytest.approx(w)
    assert max(r.model_extra["batch_size"] for r in replies) > 1


def test_a_client_that_goes_away_frees_its_row(server):
    body = {"prompt": "talk for a long time", "max_tokens": 400, "stream": True}
    req = urllib.request.Request(f"{server.url}/v1/completions", json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.readline().startswith(b"data: ")
    deadline = time.monotonic() + 30
    while "went away: its row is freed" not in server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "went away: its row is freed" in server.log.read_text()
    status, raw = post(f"{server.url}/v1/completions", {"prompt": "still there?", "max_tokens": 3})
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] <= 3


@pytest.mark.parametrize(
    "body, message",
    [
        (b'{"messages": [', "not valid JSON"),
        ({"messages": [{"role": "user", "content": "hi"}], "preference": [0.5, 0.6]}, "sums to 1.1"),
        ({"messages": [{"role": "user", "content": "hi"}], "preference": [1.0]}, "has 1 entries, expected 2"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "preference": [NaN, 1.0]}', "non-finite"),
        ({"messages": [{"role": "user", "content": "hi"}], "method": "p_two"}, "unknown method 'p_two'"),
        ({"messages": [{"role": "user", "content": "   "}]}, "the prompt is empty"),
        ({"messages": [{"role": "user", "content": "hi " * 600}]}, "tokens with its markers, over the 507"),
        ({"messages": [{"role": "user", "content": "hi " * 3000}]}, "the prompt is over 507 tokens"),
        ({"messages": []}, "messages must be a non-empty list"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature must be a number > 0"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "desired_rewards": [1, "x"]},
            "desired_rewards [1, 'x'] are not numbers",
        ),
        ([1, 2], "must be a JSON object"),
        ({"messages": [{"role": "user", "content": "hi"}], "seed": 1e20}, "seed must be an integer >= 0 and <="),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_value_and_the_server_goes_on(server, body, message):
    status, raw = post(f"{server.url}/v1/chat/completions", body)
    assert 400 <= status < 500, raw
    assert message in json.loads(raw)["error"]["message"]
    status, raw = post(f"{server.url}/v1/chat/completions",
                       {"messages": [{"role": "user", "content": "still there?"}], "max_tokens": 3})  # fmt: skip
    assert status == 200, raw


def test_models_and_health(server, space):
    status, raw = get(f"{server.url}/v1/models")
    card = json.loads(raw)["data"][0]["ric"]
    assert status == 200 and card["reward_names"] == ["verbosity", "readability"] and card["kind"] == "text"
    np.testing.assert_allclose(card["reward_range"]["r_max"], space.r_max)
    assert card["mapping"]["method"] == "linear"
    assert get(f"{server.url}/health") == (200, b"ok")
    status, raw = post(f"{server.url}/v1/images/generations", {"prompt": "a cat", "preference": [1, 0]})
    assert status == 404 and "generates text" in json.loads(raw)["error"]["message"]
    status, raw = post(f"{server.url}/v1/ric/steer", {"kind": "completion", "body": {"prompt": "hi"}})
    assert status == 404 and "/v1/completions" in json.loads(raw)["error"]["message"]


def chromium(tmp_path):
    """Headless Chromium through its WebDriver, keeping the page's console log."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1200,900"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


def test_page_in_headless_chromium(server, space, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium(tmp_path)
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.ID, "desired-verbosity"))
        before = driver.find_element(By.ID, "desired-verbosity").text
        slider = driver.find_element(By.ID, "w0")
        driver.execute_script(
            "arguments[0].value = 0.9; arguments[0].dispatchEvent(new Event('input', {bubbles: true}));", slider
        )
        wait.until(lambda d: d.find_element(By.ID, "desired-verbosity").text != before)
        assert driver.find_element(By.ID, "wv1").text == "0.10"  # the other weight follows: on the simplex
        desired = space.desired([0.9, 0.1])  # the page shows what the model's reward space computes
        assert driver.find_element(By.ID, "desired-verbosity").text == f"{desired[0]:+.2f}"
        assert driver.find_element(By.ID, "desired-readability").text == f"{desired[1]:+.2f}"
        assert driver.find_element(By.ID, "written-verbosity").text == f"{desired[0]:+.2f}"  # not calibrated
        assert driver.find_element(By.ID, "achievable-verbosity").text == "–"
        assert "Not calibrated" in driver.find_element(By.ID, "calibration").text
        driver.find_element(By.ID, "prompt").send_keys("How do I fix a squeaky door?")
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: "batch of" in d.find_element(By.ID, "status").text)
        status = driver.find_element(By.ID, "status").text
        assert f"verbosity {desired[0]:+.2f}" in status  # the response's own desired rewards
        assert driver.find_element(By.ID, "obtained-verbosity").text.startswith(("+", "-"))
        assert len(driver.find_elements(By.CSS_SELECTOR, "#front circle")) == 3  # the sweep's 3 preferences
        assert driver.find_elements(By.CSS_SELECTOR, "#front circle.current")  # the one nearest the sliders
        assert driver.find_elements(By.CSS_SELECTOR, "#front rect.last")  # the response's obtained rewards
        driver.save_screenshot(str(tmp_path / "page.png"))
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()


def test_images_endpoint_on_the_tiny_diffusion_model(trained_sd, tmp_path):
    server = Server(trained_sd, tmp_path, "--max-batch-size", "4", "--batch-timeout", "0.3")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        result = client.images.generate(prompt="a red circle on a grey background", extra_body={"preference": [1, 0]})
        image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
        assert image.size == (16, 16) and len(result.model_extra["desired_rewards"]) == 2
        extra = {"preference": [1, 0], "guidance": 2, "guidance_reference": "mirror"}
        guided = client.images.generate(prompt="a red circle on a grey background", extra_body=extra)
        assert Image.open(io.BytesIO(base64.b64decode(guided.data[0].b64_json))).size == (16, 16)
        with pytest.raises(openai.BadRequestError, match="sums to 2"):
            client.images.generate(prompt="a red circle", extra_body={"preference": [1, 1]})
        status, raw = post(f"{server.url}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 404 and "generates images" in json.loads(raw)["error"]["message"]
    finally:
        server.stop()


def test_reward_guidance_fields_of_a_request():
    from ric.serve.requests import BadRequest, sampling_settings

    body = {"messages": [{"role": "user", "content": "hi"}], "guidance": 1.5, "guidance_reference": "none"}
    assert sampling_settings("chat", body) == {"guidance": 1.5, "guidance_reference": "none"}
    with pytest.raises(BadRequest, match="guidance_reference must be one of"):
        sampling_settings("chat", {**body, "guidance_reference": "opposite"})
    with pytest.raises(BadRequest, match="guidance"):
        sampling_settings("chat", {**body, "guidance": -2})
    image = {"prompt": "a red circle", "guidance": 2, "num_inference_steps": 3}
    assert sampling_settings("image", image) == {"guidance": 2, "num_inference_steps": 3}


def test_a_calibrated_model_reports_what_it_achieves_and_writes_what_achieves_it(trained, tmp_path):
    from dataclasses import replace

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from ric.calibration import Calibration
    from ric.commands import write_reward_space

    out = tmp_path / "export"
    policy = ric.load(trained["ckpt"])
    policy.export(out)
    names = list(policy.reward_space.reward_names)
    calibration = Calibration(names, [[-1, 0, 1], [-1, 0, 1]], [[-0.2, 0.0, 0.3], [-0.5, 0.0, 0.1]])
    write_reward_space(out, replace(policy.reward_space, calibration=calibration))
    calibrated = ric.load(out)
    server = Server(out, tmp_path, "--max-batch-size", "4")
    try:
        card = json.loads(get(f"{server.url}/v1/models")[1])["data"][0]["ric"]
        assert card["achievable"]["low"] == [-0.2, -0.5] and card["achievable"]["high"] == [0.3, 0.1]
        status, raw = post(f"{server.url}/v1/ric/desired", {"preference": [1, 0]})
        body = json.loads(raw)
        assert status == 200 and body["desired_rewards"] == pytest.approx([0.3, -0.5])  # the achievable extremes
        assert body["written_rewards"] == pytest.approx([1.0, -1.0])  # what the model needs to be told for them
        status, raw = post(f"{server.url}/v1/completions", {"prompt": "and briefly?", "max_tokens": 4, "seed": 7,
                                                            "temperature": 0.7, "preference": [0.3, 0.7]})  # fmt: skip
        served = json.loads(raw)
        steered = calibrated.steer("and briefly?", [0.3, 0.7], seed=7, max_new_tokens=4, temperature=0.7)[0]
        assert served["choices"][0]["text"] == steered.sample  # both write the calibrated values
        assert served["desired_rewards"] == pytest.approx(steered.desired_rewards)
        assert steered.written_rewards != pytest.approx(steered.desired_rewards)
        driver = chromium(tmp_path)
        try:
            driver.get(server.url + "/")
            WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.ID, "achievable-verbosity"))
            assert driver.find_element(By.ID, "achievable-verbosity").text == "[-0.20, +0.30]"
            assert driver.find_element(By.ID, "achievable-readability").text == "[-0.50, +0.10]"
            desired = calibrated.reward_space.desired([0.5, 0.5])
            written = calibrated.reward_space.markers(desired)
            assert driver.find_element(By.ID, "written-verbosity").text == f"{written[0]:+.2f}"
            assert driver.find_element(By.ID, "calibration").text.startswith("Calibrated")
        finally:
            driver.quit()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def guarded(trained, tmp_path_factory):
    """A server with a key (from the environment), a 1 MB body limit and a 1 s timeout."""
    os.environ["RIC_API_KEY"] = "sesame"
    try:
        s = Server(trained["ckpt"], tmp_path_factory.mktemp("guarded"), "--max-body-mb", "1", "--timeout", "1")
    finally:
        del os.environ["RIC_API_KEY"]
    yield s
    s.stop()


def test_the_api_key_is_asked_on_every_route_but_health_and_the_page(guarded):
    client = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="sesame", max_retries=0)
    reply = client.completions.create(model="ric", prompt="hi", max_tokens=3, extra_body={"preference": [1, 0]})
    assert reply.usage.completion_tokens <= 3
    wrong = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        wrong.chat.completions.create(model="ric", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    for path in ("/v1/models", "/v1/ric/front"):
        status, raw = get(guarded.url + path)
        assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
    assert post(f"{guarded.url}/v1/ric/desired", {"preference": [1, 0]})[0] == 401
    assert get(f"{guarded.url}/health") == (200, b"ok") and get(guarded.url + "/")[0] == 200
    assert "went away" not in guarded.log.read_text()  # refused requests never reached the model


def test_the_page_asks_for_the_key(guarded, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium(tmp_path)
    try:
        driver.get(guarded.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "key-box").is_displayed())
        assert "needs its API key" in driver.find_element(By.ID, "key-note").text
        driver.find_element(By.ID, "api-key").send_keys("sesame")
        driver.find_element(By.ID, "use-key").click()
        wait.until(lambda d: d.find_elements(By.ID, "desired-verbosity"))
        assert not driver.find_element(By.ID, "key-box").is_displayed()
    finally:
        driver.quit()


def test_a_body_over_the_limit_gets_a_413_unread(guarded, server):
    huge = json.dumps({"prompt": "word " * 300_000, "max_tokens": 3}).encode()  # 1.5 MB
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sesame"}
    started = time.monotonic()
    status, raw = request(f"{guarded.url}/v1/completions", huge, "POST", headers)
    assert status == 413 and "over the server's limit of 1 MB" in json.loads(raw)["error"]["message"]
    assert time.monotonic() - started < 5
    # under the default 4 MB limit, a prompt past the context is refused on its head, not tokenized whole
    status, raw = post(f"{server.url}/v1/completions", {"prompt": "word " * 1_000_000, "max_tokens": 3})
    assert status == 413
    status, raw = post(f"{server.url}/v1/completions", {"prompt": "word " * 200_000, "max_tokens": 3})
    assert status == 400 and "the prompt is over" in json.loads(raw)["error"]["message"]


def test_a_request_past_the_timeout_gets_a_504_and_the_others_go_on(guarded):
    client = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="sesame", max_retries=0)
    client.completions.create(model="ric", prompt="warm up", max_tokens=2)  # a cold worker's first steps are slow
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(client.completions.create, model="ric", prompt="talk for a long time", max_tokens=450,
                           extra_body={"preference": [1, 0]})  # fmt: skip
        time.sleep(0.2)
        quick = client.completions.create(model="ric", prompt="briefly?", max_tokens=3)
        with pytest.raises(openai.APIStatusError, match="timeout") as err:
            slow.result()
    assert err.value.status_code == 504 and quick.usage.completion_tokens <= 3
    chunks = []
    with pytest.raises(openai.APIError, match="timeout"):
        for chunk in client.completions.create(model="ric", prompt="talk for a long time", max_tokens=450, stream=True):
            chunks.append(chunk)
    assert chunks  # the stream had started: it ends with the error
    assert "ran past the 1 s timeout" in guarded.log.read_text()


def processes_in_group(pgid: int) -> list[int]:
    """The pids whose process group is ``pgid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_main_process_stops_every_process_and_frees_the_port(trained, tmp_path, signum):
    server = Server(trained["ckpt"], tmp_path)
    try:
        assert len(processes_in_group(server.proc.pid)) > 2  # the HTTP and model workers, LitServe's manager
        stopped = time.monotonic()
        os.kill(server.proc.pid, signum)  # the main process only, as a supervisor does
        server.proc.wait(15)
        while processes_in_group(server.proc.pid) and time.monotonic() - stopped < 10:
            time.sleep(0.1)
        assert processes_in_group(server.proc.pid) == [], server.log.read_text()[-2000:]
        assert time.monotonic() - stopped < 10
        assert "Traceback" not in server.log.read_text()  # a quiet stop
        with socket.socket() as s:  # the port can be listened on again, as a restarted server does
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", server.port))
            s.listen()
    finally:
        server.stop()
