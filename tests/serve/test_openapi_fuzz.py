"""Schemathesis, when it is installed (it is not a dependency of orionlm): requests generated from the server's
own OpenAPI spec (valid and invalid), sent to the app in this process. Every answer must match the spec: never a
5xx, a documented status and content type, a body of the documented schema (the events of a stream too), and an
invalid request refused. That a valid request may still be refused (a prompt of no tokens, token ids past the
vocabulary: what the schema cannot say) is allowed. The model's context is 64 tokens, so each case is quick:
about 20 s for all."""

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from orionlm.config import preset  # noqa: E402
from orionlm.generation.engine import Engine  # noqa: E402
from orionlm.model import OrionLM  # noqa: E402
from orionlm.serve.api import create_app  # noqa: E402
from orionlm.serve.serving import AsyncEngine, Server  # noqa: E402
from orionlm.tokenizer import Tokenizer  # noqa: E402

NAME = "tiny"


@pytest.fixture(scope="module")
def api_schema(served_model_dir):
    tokenizer = Tokenizer.load(served_model_dir)
    model = OrionLM(preset("tiny-dense", vocab_size=tokenizer.vocab_size, max_seq_len=64))
    model.reset_parameters(seed=0)
    app = create_app(Server(AsyncEngine(Engine(model, max_batch=4, prefill_chunk=16)), tokenizer, NAME, {}))
    spec = app.openapi()
    for request in ("CompletionRequest", "ChatCompletionRequest"):  # the server's model, or nearly every case is a 404
        spec["components"]["schemas"][request]["properties"]["model"] = {"type": "string", "enum": [NAME]}
    schema = schemathesis.openapi.from_dict(spec)
    schema.app = app
    return schema


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]  # fmt: skip


def test_every_answer_matches_the_spec(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) == 7
    for operation in operations:  # (schemathesis's own pytest fixture support does not run on pytest 9)

        @given(
            case=st.one_of(operation.as_strategy(mode) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE))
        )
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        def answer_matches(case):
            case.call_and_validate(checks=CHECKS)

        answer_matches()
