"""The playground page at `/`: base and adapters answering one prompt side by side, adapters
loaded from the allowed folders; driven in a real headless Chromium where one is installed."""

import shutil

import pytest
from test_server import (
    BASE,
    TestClient,
    chat_ids,
    create_app,
    engine_with,
    make_adapters,
    real_server,
    reference,
)


@pytest.fixture
def served(tmp_path, tiny_tokenizer):
    """A server over a tiny model with adapter "a" loaded and "b" only in the allowed folder."""
    paths = make_adapters("llama", tmp_path / "adapters")
    engine = engine_with({"a": paths["a"]}, tiny_tokenizer)
    app = create_app(
        engine, tiny_tokenizer, BASE, adapter_dirs=[tmp_path / "adapters"], api_key="k"
    )
    return app, paths


def test_the_page_and_the_adapters_it_can_load(served):
    app, paths = served
    with TestClient(app) as client:
        page = client.get("/")  # the page itself needs no key: its calls carry it
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "lorakit playground" in page.text and "/v1/chat/completions" in page.text
        assert client.get("/v1/adapters").status_code == 401
        rows = client.get("/v1/adapters", headers={"Authorization": "Bearer k"}).json()["data"]
        by_name = {r["name"]: r for r in rows}
        assert set(by_name) == {"a", "b"}
        assert by_name["a"]["loaded"] and by_name["a"]["loaded_as"] == "a"
        assert not by_name["b"]["loaded"] and by_name["b"]["suggested_name"] == "b"
        assert by_name["b"]["path"] == str(paths["b"].resolve())


def test_the_list_has_each_adapter_once_under_a_name_no_other_has(tmp_path, tiny_tokenizer):
    root = tmp_path / "adapters"
    paths = make_adapters("llama", root / "x")
    for name, path in paths.items():  # x/a, x/b and a copy of each as y/a, y/b
        shutil.copytree(path, root / "y" / name)
    (root / ".hidden").mkdir()
    shutil.copytree(paths["a"], root / ".hidden" / "a")
    shutil.copytree(paths["a"], root / "1" / "2" / "3" / "deep")  # three folders down
    engine = engine_with({"x-a": paths["a"]}, tiny_tokenizer)
    app = create_app(engine, tiny_tokenizer, BASE, adapter_dirs=[root, root / "x", root / "y"])
    with TestClient(app) as client:
        rows = client.get("/v1/adapters").json()["data"]
    assert sorted(r["name"] for r in rows) == ["x/a", "x/b", "y/a", "y/b"]
    names = [r["suggested_name"] for r in rows]
    assert len(set(names)) == 4 and "x-a" in names  # the loaded one keeps its name
    assert [r["loaded_as"] for r in rows if r["loaded"]] == ["x-a"]


def _chromium() -> str | None:
    return next(
        (p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))),
        None,
    )


@pytest.mark.skipif(_chromium() is None, reason="no Chromium here (apt-get install chromium)")
def test_in_a_browser_the_answers_stream_side_by_side(served, tiny_tokenizer, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    app, paths = served
    tok, n, question = tiny_tokenizer, 12, "What does foo mean?"
    want = {
        m: tok.decode(
            reference("llama", paths.get(m), chat_ids(tok, question), n, [tok.eos_token_id]),
            skip_special_tokens=True,
        ).rstrip("\ufffd")
        for m in (BASE, "a", "b")
    }
    assert len(set(want.values())) == 3  # the adapters change the answer
    with real_server(app) as url, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.fill("#key", "k")
        page.dispatch_event("#key", "change")  # the key is kept, the lists are fetched with it
        page.wait_for_selector("#available button")  # "b" can be loaded, "a" is loaded
        assert page.locator("#models input").count() == 2
        page.click("#available button")
        page.wait_for_selector("#models input[value=b]")
        for box in page.locator("#models input").all():
            box.check()
        page.fill("#prompt", question)
        page.fill("#max_tokens", str(n))
        page.click("#run")
        page.wait_for_function(
            "[...document.querySelectorAll('.answer')].length === 3 && "
            "[...document.querySelectorAll('.answer')].every(d => d.dataset.done)"
        )
        page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
        got = {
            card.locator("h3").inner_text(): card.locator("pre").inner_text()
            for card in page.locator(".answer").all()
        }
        metas = page.locator(".answer .meta").all_inner_texts()
        browser.close()
    assert not errors, errors
    assert got == want
    assert all("tok/s" in m for m in metas), metas
