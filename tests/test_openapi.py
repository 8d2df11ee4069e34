"""GET /v1/openapi.json: served without a key, a loadable OpenAPI 3 document, true to the routes.

Its required fields are the relay's (relay.REQUIRED_FIELDS), every route of the api
blueprint is described (SPEC §5 and count_tokens), and each route's errors use its shape.
"""
import schemathesis

from blueprints.api.relay import REQUIRED_FIELDS

PATH_OF = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
           "embeddings": "/v1/embeddings", "responses": "/v1/responses",
           "images": "/v1/images/generations", "audio_speech": "/v1/audio/speech",
           "messages": "/v1/messages", "messages_count_tokens": "/v1/messages/count_tokens",
           "audio_transcriptions": "/v1/audio/transcriptions",
           "audio_translations": "/v1/audio/translations"}


def resolve(document, node):
    while "$ref" in node:
        node = document["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def test_served_without_a_key_and_loadable(client):
    response = client.get("/v1/openapi.json")
    assert response.status_code == 200 and response.headers["x-request-id"]
    document = response.get_json()
    assert document["openapi"].startswith("3.")
    schema = schemathesis.openapi.from_dict(document)
    labels = {result.ok().label for result in schema.get_all_operations()}
    assert len(labels) == 14


def test_every_api_route_is_described(app, client):
    document = client.get("/v1/openapi.json").get_json()
    described = {(method.upper(), path) for path, item in document["paths"].items()
                 for method in item}
    served = {(method, rule.rule.replace("<path:model_id>", "{model_id}"))
              for rule in app.url_map.iter_rules() if rule.endpoint.startswith("api.")
              and rule.rule != "/v1/openapi.json"
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert described == served


def test_required_fields_are_the_relays(client):
    document = client.get("/v1/openapi.json").get_json()
    for endpoint, path in PATH_OF.items():
        content = document["paths"][path]["post"]["requestBody"]["content"]
        [(media, body)] = content.items()
        required = set(resolve(document, body["schema"])["required"])
        expected = {"model", *REQUIRED_FIELDS.get(endpoint, ())}
        if media == "multipart/form-data":
            expected.add("file")
        assert required == expected, path


def test_each_route_documents_errors_in_its_own_shape(client):
    document = client.get("/v1/openapi.json").get_json()
    for path, item in document["paths"].items():
        for operation in item.values():
            errors = {status: answer for status, answer in operation["responses"].items()
                      if status >= "400"}
            assert {"401"} <= set(errors), path
            shape = "AnthropicError" if path.startswith("/v1/messages") else "OpenAIError"
            for answer in errors.values():
                ref = answer["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/" + shape), (path, ref)


def test_base_is_the_narrow_interface_without_provider_conversions():
    """STYLE.md: base.py imported anthropic_convert (which imports base): no circle now."""
    import ast
    import inspect

    from blueprints.api.providers import base
    imported = {node.module for node in ast.walk(ast.parse(inspect.getsource(base)))
                if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(ast.parse(inspect.getsource(base)))
                 if isinstance(node, ast.Import) for alias in node.names}
    assert not [name for name in imported if "providers" in (name or "")]
    assert not hasattr(base.Adaptor, "send_messages")
