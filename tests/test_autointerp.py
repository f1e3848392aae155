"""Automatic interpretation: prompts and parsing, scorers on hand-computed cases, the chat client
against a local chat-completions server, and the `explain`/`score` commands."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from sae_circuits.autointerp import (
    ChatClient,
    ChatError,
    Example,
    OfflineExplainer,
    OfflineSimulator,
    Record,
    ResponseError,
    UnitContexts,
    balanced_accuracy,
    pearson,
    score_explanation,
)
from sae_circuits.autointerp.cache import ResultCache
from sae_circuits.autointerp.contexts import normalized
from sae_circuits.autointerp.prompts import (
    classifier_messages,
    explainer_messages,
    highlighted,
    parse_explanation,
    parse_labels,
    parse_simulation,
    prompt_hash,
    simulator_messages,
)
from sae_circuits.autointerp.scoring import fuzzing_examples
from sae_circuits.cli import main
from sae_circuits.sites import Site


# ------------------------------------------------------------------------------- prompts
def test_highlighting_marks_runs_and_escapes_newlines():
    assert highlighted(["a", " b", " c", "\n", "d"], [False, True, True, False, True]) == (
        "a<< b c>>\\n<<d>>"
    )


def test_normalized_activations_are_floored_to_0_10():
    assert normalized([0.0, 3.79, 5.0, 10.0, 12.0, -1.0], 10.0) == [0, 3, 5, 10, 10, 0]
    assert normalized([1.0, 2.0], 0.0) == [0, 0]


def test_explainer_prompt_marks_active_tokens_and_lists_activations():
    record = Record(["The", " cat", " sat"], [0.0, 8.0, 2.0])
    messages = explainer_messages([record], max_activation=8.0, threshold=0.3)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "[EXPLANATION]:" in messages[0]["content"]
    assert messages[1]["content"] == (
        'Example 1: The<< cat>> sat\nActivations: (" cat", 10), (" sat", 2)'
    )


def test_parse_explanation():
    assert parse_explanation("Step 1 ...\n[EXPLANATION]: the word cat\n") == "the word cat"
    assert parse_explanation("a first line\nnouns for animals") == "nouns for animals"
    with pytest.raises(ResponseError):
        parse_explanation("[EXPLANATION]:   \n")


def test_simulator_prompt_and_parsing():
    tokens = ["The", " cat", "\n"]
    prompt = simulator_messages("cats", tokens)[1]["content"]
    assert prompt.endswith("Tokens:\nThe\t\n cat\t\n\\n\t")
    assert parse_simulation("The\t0\ncat\t9\n\\n\t1\n", tokens) == [0.0, 9.0, 1.0]
    assert parse_simulation("The\t0\n cat\t11\n\\n\tx", tokens) == [0.0, 0.0, 0.0]
    assert parse_simulation("The\t0\n dog\t9\n\\n\t1", tokens) == [0.0, 0.0, 0.0]
    assert parse_simulation("The\t0\n cat\t9", tokens) == [0.0, 0.0, 0.0]


def test_classifier_prompt_and_labels():
    examples = [Example(["a", " cat"], [False, True]), Example(["a", " dog"])]
    content = classifier_messages("cats", examples, "fuzzing")[1]["content"]
    assert content == "Explanation: cats\n\nExample 1: a<< cat>>\nExample 2: a dog"
    assert parse_labels("Sure. [1, 0]", 2) == [1, 0]
    for bad in ("no list", "[1, 0, 1]", "[1, 2]", "[1, 'a']"):
        with pytest.raises(ResponseError):
            parse_labels(bad, 2)


def test_prompt_hash_is_stable_and_sensitive():
    a = [{"role": "user", "content": "x"}]
    assert prompt_hash(a) == prompt_hash([dict(a[0])])
    assert prompt_hash(a) != prompt_hash([{"role": "user", "content": "y"}])


# ------------------------------------------------------------------------------- scorers
def test_pearson_matches_torch_and_constant_is_zero():
    x, y = [0.0, 1.0, 5.0, 2.0, 0.0], [0.0, 2.0, 9.0, 1.0, 1.0]
    expected = torch.corrcoef(torch.tensor([x, y], dtype=torch.float64))[0, 1].item()
    assert pearson(x, y) == pytest.approx(expected, abs=1e-12)
    assert pearson(x, [3.0] * 5) == 0.0


def test_balanced_accuracy_by_hand():
    # positives: 2 of 3 right; negatives: 1 of 2 right (None counts wrong)
    assert balanced_accuracy([1, 1, 1, 0, 0], [1, 0, 1, 0, None]) == pytest.approx(
        (2 / 3 + 0.5) / 2
    )
    assert balanced_accuracy([1, 1], [1, 1]) is None


def cat_contexts() -> UnitContexts:
    """A unit that fires on " cat" (10) only: 6 top contexts, 6 random ones without cats."""
    top = [
        Record(["I", " saw", " a", " cat", " run"], [0.0, 0.0, 0.0, 10.0 - i, 0.0])
        for i in range(6)
    ]
    random = [Record(["The", " dog", " ate", " food", "."], [0.0] * 5) for _ in range(6)]
    return UnitContexts(unit=7, top=top, random=random)


def test_scores_of_right_and_wrong_explanations():
    contexts = cat_contexts()
    judge = OfflineSimulator()
    true = [a for r in contexts.held_out + contexts.random[:3] for a in r.activations]
    assert true[:15] == [0, 0, 0, 9, 0, 0, 0, 0, 7, 0, 0, 0, 0, 5, 0]  # held-out ranks 1, 3, 5

    def corr(predicted):
        return torch.corrcoef(torch.tensor([true, predicted]))[0, 1].item()

    right = score_explanation(contexts, 'fires on "cat" (10)', judge)
    cats = [0.0, 0, 0, 10, 0] * 3 + [0.0] * 15
    assert right["simulation"] == pytest.approx(corr(cats), abs=1e-6)
    assert right["detection"] == 1.0 and right["fuzzing"] == 1.0
    wrong = score_explanation(contexts, 'fires on "dog" (10)', judge)
    dogs = [0.0] * 15 + [0.0, 10, 0, 0, 0] * 3
    assert wrong["simulation"] == pytest.approx(corr(dogs), abs=1e-6)
    assert wrong["detection"] == 0.0  # every positive missed, every negative flagged
    # fuzzing: positives (cats marked) all rejected; a negative is accepted iff its mark hit " dog"
    rng = random.Random(contexts.unit)  # the scorer's generator for seed 0
    negatives = [e for e, label in fuzzing_examples(contexts, 0.3, rng) if label == 0]
    rejected = [not e.marked[1] for e in negatives]
    assert wrong["fuzzing"] == pytest.approx((0 + sum(rejected) / len(rejected)) / 2)


class ScriptedJudge:
    """Simulates fixed values and answers the classifiers with the truth of a lookup table."""

    name = "scripted"

    def __init__(self, values, labels):
        self.values, self.labels, self.seen = values, labels, []

    def simulate(self, explanation, tokens):
        return self.values[len(tokens)]

    def classify(self, explanation, examples, task):
        self.seen.append((task, [e.text() for e in examples]))
        return [self.labels(task, e) for e in examples]


def test_simulation_correlates_over_all_tokens_at_once():
    contexts = cat_contexts()
    judge = ScriptedJudge({5: [0.0, 1.0, 0.0, 8.0, 0.0]}, lambda task, e: 1)
    scores = score_explanation(contexts, "anything", judge)
    true = [a for r in contexts.held_out + contexts.random[:3] for a in r.activations]
    expected = torch.corrcoef(torch.tensor([true, [0.0, 1.0, 0.0, 8.0, 0.0] * 6]))[0, 1]
    assert scores["simulation"] == pytest.approx(expected.item(), abs=1e-6)
    assert scores["detection"] == 0.5 and scores["fuzzing"] == 0.5  # always 1
    fuzz = dict(judge.seen)["fuzzing"]
    assert sum("<< cat>>" in text for text in fuzz) == 3  # held-out positives, rightly marked
    assert sum(text.count("<<") == 1 for text in fuzz) == 6  # one mark each (mean active = 1)


def test_offline_explainer_round_trips_through_the_offline_simulator():
    contexts = cat_contexts()
    explanation = OfflineExplainer().explain(contexts)
    assert explanation == 'fires on "cat" (8)'  # explained ranks 0, 2, 4: 10, 8, 6 of max 10
    assert OfflineSimulator().simulate(explanation, ["a", " Cat", " dog"]) == [0.0, 8.0, 0.0]


def test_offline_rules_keep_whitespace_tokens_and_read_free_text():
    top = [Record(["a", "\n", "b", "\n"], [0.0, 6.0, 0.0, 6.0])] * 2
    explanation = OfflineExplainer().explain(UnitContexts(3, top, []))
    assert explanation == 'fires on "\\n" (10)'
    assert OfflineSimulator().simulate(explanation, ["x", "\n", " "]) == [0.0, 10.0, 0.0]
    free = OfflineSimulator().simulate("the word Cat in stories", [" cat", " the", " stories"])
    assert free == [10.0, 0.0, 10.0]


def test_offline_explainer_finds_previous_token_rules():
    tokens = [["x", " of", w, "."] for w in (" a", " b", " c", " d")]
    top = [Record(t, [0.0, 0.0, 10.0, 0.0]) for t in tokens]
    contexts = UnitContexts(1, top, [Record(["q"], [0.0])])
    explanation = OfflineExplainer().explain(contexts)
    assert 'after "of" (10)' in explanation
    assert OfflineSimulator().simulate(explanation, [" of", " z"])[1] == 10.0


def test_dead_unit_and_missing_negatives():
    dead = UnitContexts(2, [], [Record(["a"], [0.0])])
    assert OfflineExplainer().explain(dead) == "never fires on the scanned text"
    busy = cat_contexts()
    busy.random = [Record(["a", " cat"], [0.0, 9.0])] * 3  # no quiet context to contrast with
    scores = score_explanation(busy, 'fires on "cat"', OfflineSimulator())
    assert scores["detection"] is None and scores["fuzzing"] is None


def test_cache_writes_whole_files(tmp_path):
    cache = ResultCache(tmp_path)
    site = Site.parse("resid.2")
    cache.save("sae", site, 3, {"explanation": "x"})
    assert cache.load("sae", site, 3) == {"explanation": "x"}
    assert [p.name for p in (tmp_path / "sae" / "resid.2").iterdir()] == ["3.json"]
    assert ResultCache(None).load("sae", site, 3) == {}


# ------------------------------------------------------------------------------- client
def chat_reply(content: str) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


class ChatServer:
    """A chat-completions server on 127.0.0.1: `script` (one entry per request, the last one
    repeats) gives (status, content, headers, delay); `answer(body)` (content, or (status,
    message)) answers when the script is empty. Every request body and its headers are recorded."""

    def __init__(self, script=(), answer=None):
        self.script, self.answer, self.requests = list(script), answer, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, dict(self.headers), body))
                if server.script:
                    entry = server.script.pop(0) if len(server.script) > 1 else server.script[0]
                    status, content, headers, delay = entry
                else:
                    answer = server.answer(body)
                    status, content = answer if isinstance(answer, tuple) else (200, answer)
                    headers, delay = {}, 0
                time.sleep(delay)
                if status != 200:
                    payload = json.dumps({"error": {"message": content}}).encode()
                    self.send_response(status)
                elif body.get("stream"):
                    events = [
                        {"choices": [{"index": 0, "delta": {"content": content[i : i + 3]}}]}
                        for i in range(0, len(content), 3)
                    ]
                    text = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
                    payload = (": keep-alive\n\n" + text + "data: [DONE]\n\n").encode()
                    self.send_response(200)
                    headers = {"Content-Type": "text/event-stream", **headers}
                else:
                    payload = (
                        content.encode()
                        if headers.get("raw")
                        else json.dumps(chat_reply(content)).encode()
                    )
                    self.send_response(200)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(script=(), answer=None):
        servers.append(ChatServer(script, answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MESSAGES = [{"role": "user", "content": "hi"}]


def test_client_non_streaming_sends_model_messages_and_key(serve, monkeypatch):
    server = serve([(200, "hello", {}, 0)])
    monkeypatch.setenv("MY_KEY", "sk-test")
    client = ChatClient.from_environment(server.url, "tiny", "MY_KEY")
    assert client.complete(MESSAGES) == "hello"
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "tiny" and body["messages"] == MESSAGES and body["stream"] is False


def test_client_without_key_sends_no_authorization(serve, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    server = serve([(200, "ok", {}, 0)])
    ChatClient.from_environment(server.url + "/chat/completions", "m", "NO_SUCH_KEY").complete(
        MESSAGES
    )
    path, headers, _ = server.requests[0]
    assert path == "/v1/chat/completions" and "Authorization" not in headers


def test_client_streaming_joins_the_deltas(serve):
    server = serve([(200, "a streamed reply", {}, 0)])
    assert ChatClient(server.url, "m", stream=True).complete(MESSAGES) == "a streamed reply"
    assert server.requests[0][2]["stream"] is True


def test_client_retries_429_and_5xx_with_exponential_backoff(serve):
    server = serve([(429, "slow down", {}, 0), (503, "busy", {}, 0), (500, "oops", {}, 0),
                    (200, "finally", {}, 0)])  # fmt: skip
    waits = []
    client = ChatClient(server.url, "m", retries=4, backoff=0.5, sleep=waits.append)
    assert client.complete(MESSAGES) == "finally"
    assert waits == [0.5, 1.0, 2.0] and len(server.requests) == 4


def test_client_honours_retry_after(serve):
    server = serve([(429, "wait", {"Retry-After": "3"}, 0), (200, "ok", {}, 0)])
    waits = []
    assert ChatClient(server.url, "m", sleep=waits.append).complete(MESSAGES) == "ok"
    assert waits == [3.0]


def test_client_gives_up_after_its_retries(serve):
    server = serve([(502, "down", {}, 0)])
    waits = []
    client = ChatClient(server.url, "m", retries=2, backoff=1.0, sleep=waits.append)
    with pytest.raises(ChatError, match="HTTP 502 down.*3 attempts"):
        client.complete(MESSAGES)
    assert waits == [1.0, 2.0] and len(server.requests) == 3


def test_client_does_not_retry_client_errors(serve):
    server = serve([(401, "bad key", {}, 0)])
    with pytest.raises(ChatError, match="HTTP 401 bad key"):
        ChatClient(server.url, "m", sleep=lambda s: None).complete(MESSAGES)
    assert len(server.requests) == 1


def test_client_times_out_and_retries(serve):
    server = serve([(200, "late", {}, 0.6), (200, "on time", {}, 0)])
    waits = []
    client = ChatClient(server.url, "m", timeout=0.2, retries=1, sleep=waits.append)
    assert client.complete(MESSAGES) == "on time"
    assert waits == [1.0]
    slow = serve([(200, "late", {}, 0.6)])
    with pytest.raises(ChatError, match="no reply within 0.2 s"):
        ChatClient(slow.url, "m", timeout=0.2, retries=0).complete(MESSAGES)


def test_client_reports_refused_connections_and_bad_replies(serve):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    with pytest.raises(ChatError, match="cannot connect.*1 attempts"):
        ChatClient(url, "m", retries=0).complete(MESSAGES)
    server = serve([(200, "not json", {"raw": "1"}, 0)])
    with pytest.raises(ChatError, match="not a chat completion"):
        ChatClient(server.url, "m").complete(MESSAGES)


# ------------------------------------------------------------------------------- commands
SMALL = ["--tokens", "4096", "--top-contexts", "6", "--random-contexts", "6"]


def run_json(capsys, argv):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_explain_offline_on_the_shipped_dictionary(capsys):
    document = run_json(capsys, ["explain", "resid.2/359", *SMALL])
    (unit,) = document["units"]
    assert unit["unit"] == "resid.2/359" and unit["basis"] == "sae"
    assert unit["explanation"].startswith("fires on ") and unit["max_activation"] > 0


def test_score_compares_bases_and_resumes_from_the_cache(tmp_path, capsys):
    argv = ["score", "resid.2", "--features", "2", "--basis", "sae", "neurons", "pca", *SMALL]
    argv += ["--out", str(tmp_path)]
    first = run_json(capsys, argv)
    assert [u["basis"] for u in first["units"]] == [
        "sae",
        "sae",
        "neurons",
        "neurons",
        "pca",
        "pca",
    ]
    assert set(first["summary"]) == {"sae", "neurons", "pca"}
    for unit in first["units"]:
        assert -1 <= unit["scores"]["simulation"] <= 1
        path = tmp_path / unit["basis"] / "resid.2" / f"{unit['index']}.json"
        assert json.loads(path.read_text())["scores"] == unit["scores"]
    sims = [u["scores"]["simulation"] for u in first["units"] if u["basis"] == "sae"]
    summary = first["summary"]["sae"]["simulation"]
    assert summary["mean"] == pytest.approx(sum(sims) / 2) and summary["n"] == 2
    assert run_json(capsys, argv)["units"] == first["units"]


def explaining_server(serve, fail_after=None):
    """An LLM that explains "cat-like tokens", simulates zeros and classifies all as 1; with
    `fail_after`, explainer requests after that many answer HTTP 500."""
    count = {"explain": 0}

    def answer(body):
        system = body["messages"][0]["content"]
        user = body["messages"][1]["content"]
        if system.startswith("You study"):
            count["explain"] += 1
            if fail_after is not None and count["explain"] > fail_after:
                return 500, "scripted failure"
            return "Step 1: looked.\n[EXPLANATION]: cat-like tokens"
        if system.startswith("You predict"):
            lines = user.split("Tokens:\n", 1)[1].split("\n")
            return "\n".join(f"{line}0" for line in lines)
        return json.dumps([1] * user.count("\nExample "))

    return serve(answer=answer), count


def test_score_through_an_llm_endpoint(serve, tmp_path, capsys):
    server, count = explaining_server(serve)
    argv = ["score", "resid.2/359", *SMALL, "--llm-url", server.url, "--llm-model", "m"]
    document = run_json(capsys, [*argv, "--stream"])
    (unit,) = document["units"]
    assert unit["explanation"] == "cat-like tokens" and unit["explainer"] == "llm:m"
    assert unit["scores"] == {"simulation": 0.0, "detection": 0.5, "fuzzing": 0.5}
    assert count["explain"] == 1 and all(body["stream"] for _, _, body in server.requests)


def test_bad_endpoint_is_a_one_line_error(capsys):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    argv = ["explain", "resid.2/359", *SMALL, "--llm-url", url, "--llm-model", "m"]
    assert main([*argv, "--retries", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sae-circuits explain: error: ") and "cannot connect" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_a_failed_unit_keeps_the_finished_ones(serve, tmp_path, capsys):
    failing, _ = explaining_server(serve, fail_after=1)
    argv = ["explain", "resid.2", "--features", "3", *SMALL, "--out", str(tmp_path)]
    assert main([*argv, "--llm-url", failing.url, "--llm-model", "m", "--retries", "0"]) == 2
    assert "HTTP 500" in capsys.readouterr().err
    (kept,) = (tmp_path / "sae" / "resid.2").glob("*.json")
    assert json.loads(kept.read_text())["explanation"] == "cat-like tokens"
    healthy, count = explaining_server(serve)
    document = run_json(capsys, [*argv, "--llm-url", healthy.url, "--llm-model", "m"])
    assert len(document["units"]) == 3 and count["explain"] == 2  # the kept unit is not asked again


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["explain", "resid.2"], "--features N"),
        (["explain", "resid.2/3", "--features", "2"], "--features N"),
        (["score", "resid.2/3", "--simulator", "llm"], "needs --llm-url and --llm-model"),
        (["explain", "resid.2/300", "--basis", "neurons", *SMALL], "out of range"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
