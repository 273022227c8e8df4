"""`leanlm serve --compress-context N` through the openai client on a real port: long prompts reach the
model at about N tokens, short ones untouched; a prompt whose question alone is too long gets an OpenAI
error and the server keeps serving."""

import httpx
import openai
import pytest

from tests.serve_helpers import Server, write_chat_model

LIMIT = 80
CONTEXT = ("The for statement is used to iterate over the elements of a sequence such as a string, tuple or list. "
           "The while statement is used for repeated execution as long as an expression is true. "
           "A module can contain executable statements as well as function definitions, executed only the first "
           "time the module name is encountered in an import statement. Exceptions are raised by the raise "
           "statement and handled by try statements with except clauses. ") * 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("serve-compress")
    model = write_chat_model(work / "model")
    srv = Server([str(model), "--served-model-name", "tiny", "--max-len", "1024", "--compress-context", str(LIMIT)],
                 work / "server.log")
    srv.model = model
    yield srv
    assert srv.stop() == 0


def test_long_prompts_are_compressed_and_short_ones_pass(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    messages = [{"role": "system", "content": CONTEXT}, {"role": "user", "content": "What does raise do?"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
    assert LIMIT * 0.8 <= reply.usage.prompt_tokens <= LIMIT * 1.05 and reply.usage.completion_tokens == 4
    short = client.chat.completions.create(model="tiny", messages=messages[1:], max_tokens=4, temperature=0)
    text = client.completions.create(model="tiny", prompt=CONTEXT, max_tokens=3, temperature=0)
    assert text.usage.prompt_tokens <= LIMIT * 1.05
    metrics = httpx.get(server.url + "/metrics").text
    assert "leanlm_compressed_prompts_total 2.0" in metrics
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server.model)
    as_written = tok.apply_chat_template(messages[1:], tokenize=False, add_generation_prompt=True)
    assert short.usage.prompt_tokens == len(tok(as_written, add_special_tokens=False)["input_ids"]) < LIMIT
    # a question too long to leave room for any context: the API's error, and the server serves on
    question = "Explain, word by word, " + "every statement of the language " * 20
    with pytest.raises(openai.BadRequestError, match="compress-context"):
        client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": CONTEXT},
                                                               {"role": "user", "content": question}], max_tokens=2)
    assert client.chat.completions.create(model="tiny", messages=messages[1:], max_tokens=2).choices[0].message


def test_compress_context_needs_a_model_it_can_score_with():
    from leanlm.errors import ConfigError
    from leanlm.serve.server import ServeConfig

    with pytest.raises(ConfigError, match="compress_context must be 0"):
        ServeConfig(compress_context=-5).validate()
    with pytest.raises(ConfigError, match="--upstream does not load"):
        ServeConfig(compress_context=100, upstream="http://127.0.0.1:9").validate()
    with pytest.raises(ConfigError, match="--backend leanlm"):
        ServeConfig(compress_context=100, backend="llama.cpp").validate()
