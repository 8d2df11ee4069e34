"""The OpenAPI 3 description of the /v1 routes, served at GET /v1/openapi.json.

It states what the gateway itself checks (required fields, their types, the bounded integers,
the Messages shapes of validation.py) and the error body of each route; any other field is
passed through to the upstream, so request objects allow additional properties.
"""
from copy import deepcopy

INT32 = 2**31 - 1  # relay.MAX_OUTPUT_CAP: the largest output cap a request may ask for
MAX_CHOICES = 128  # relay.MAX_CHOICES


def _ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def _cap(description):
    return {"type": "integer", "minimum": 1, "maximum": INT32, "nullable": True,
            "description": description}


def _count(description):
    return {"type": "integer", "minimum": 1, "maximum": MAX_CHOICES, "nullable": True,
            "description": description}


MODEL = {"type": "string", "minLength": 1, "maxLength": 200,
         "description": "A model this key may use (GET /v1/models); printable text."}
STREAM = {"type": "boolean", "description": "Server-sent events instead of one JSON body."}
OBJECT = {"type": "object", "additionalProperties": True}

SCHEMAS = {
    "OpenAIError": {
        "type": "object", "required": ["error"], "additionalProperties": False,
        "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"],
            "additionalProperties": False,
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string", "enum": [
                    "invalid_request_error", "authentication_error", "insufficient_quota",
                    "permission_error", "rate_limit_error", "upstream_error", "api_error",
                    "not_found_error", "server_error"],
                    "description": "SPEC §9; an upstream's own type may pass through on 4xx."},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True}}}}},
    "AnthropicError": {
        "type": "object", "required": ["type", "error"], "additionalProperties": False,
        "properties": {
            "type": {"type": "string", "enum": ["error"]},
            "error": {"type": "object", "required": ["type", "message"],
                      "additionalProperties": False,
                      "properties": {
                          "type": {"type": "string", "enum": [
                              "invalid_request_error", "authentication_error",
                              "billing_error", "permission_error", "not_found_error",
                              "request_too_large", "rate_limit_error", "api_error",
                              "overloaded_error"]},
                          "message": {"type": "string"}}}}},
    "ChatContentPart": {"type": "object", "required": ["type"], "additionalProperties": True,
                        "properties": {"type": {"type": "string"},
                                       "text": {"type": "string"}}},
    "ChatMessage": {
        "type": "object", "required": ["role"], "additionalProperties": True,
        "properties": {
            "role": {"type": "string",
                     "enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": {"oneOf": [
                {"type": "string", "nullable": True},
                {"type": "array", "items": _ref("ChatContentPart")}]},
            "name": {"type": "string"},
            "tool_call_id": {"type": "string"},
            "tool_calls": {"type": "array", "items": {
                "type": "object", "required": ["function"],
                "properties": {"id": {"type": "string"}, "type": {"type": "string"},
                               "function": {"type": "object", "properties": {
                                   "name": {"type": "string"},
                                   "arguments": {"type": "string"}}}}}}}},
    "ChatTool": {
        "type": "object", "required": ["type", "function"], "additionalProperties": True,
        "properties": {"type": {"type": "string", "enum": ["function"]},
                       "function": {"type": "object", "required": ["name"],
                                    "properties": {"name": {"type": "string"},
                                                   "description": {"type": "string"},
                                                   "parameters": OBJECT}}}},
    "ChatCompletionRequest": {
        "type": "object", "required": ["model", "messages"], "additionalProperties": True,
        "properties": {
            "model": MODEL,
            "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
            "max_tokens": _cap("Output cap per choice (legacy name)."),
            "max_completion_tokens": _cap("Output cap per choice."),
            "n": _count("Choices to generate; the hold is multiplied by it."),
            "stream": STREAM,
            "stream_options": {"type": "object", "properties": {
                "include_usage": {"type": "boolean"}}},
            "tools": {"type": "array", "items": _ref("ChatTool")},
            "tool_choice": {"oneOf": [
                {"type": "string", "enum": ["none", "auto", "required"]},
                {"type": "object", "required": ["type", "function"],
                 "properties": {"type": {"type": "string", "enum": ["function"]},
                                "function": {"type": "object", "required": ["name"],
                                             "properties": {"name": {"type": "string"}}}}}]},
            "stop": {"oneOf": [{"type": "string", "nullable": True},
                               {"type": "array", "items": {"type": "string"}}]},
            "response_format": {"type": "object", "properties": {"type": {"type": "string"}}},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "top_p": {"type": "number", "minimum": 0, "maximum": 1},
            "user": {"type": "string"}}},
    "CompletionRequest": {
        "type": "object", "required": ["model", "prompt"], "additionalProperties": True,
        "properties": {
            "model": MODEL,
            "prompt": {"oneOf": [{"type": "string", "minLength": 1},
                                 {"type": "array", "minItems": 1,
                                  "items": {"type": "string"}}]},
            "max_tokens": _cap("Output cap per choice."),
            "n": _count("Choices to generate."), "best_of": _count("Candidates generated."),
            "stream": STREAM, "temperature": {"type": "number", "minimum": 0, "maximum": 2}}},
    "EmbeddingRequest": {
        "type": "object", "required": ["model", "input"], "additionalProperties": True,
        "properties": {
            "model": MODEL,
            "input": {"oneOf": [{"type": "string", "minLength": 1},
                                {"type": "array", "minItems": 1,
                                 "items": {"type": "string"}}]},
            "encoding_format": {"type": "string", "enum": ["float", "base64"]},
            "dimensions": {"type": "integer", "minimum": 1}}},
    "ResponsesRequest": {
        "type": "object", "required": ["model", "input"], "additionalProperties": True,
        "properties": {
            "model": MODEL,
            "input": {"oneOf": [{"type": "string", "minLength": 1},
                                {"type": "array", "minItems": 1, "items": OBJECT}]},
            "instructions": {"type": "string"},
            "max_output_tokens": _cap("Output cap."),
            "stream": STREAM}},
    "ImageRequest": {
        "type": "object", "required": ["model", "prompt"], "additionalProperties": True,
        "properties": {"model": MODEL, "prompt": {"type": "string", "minLength": 1},
                       "n": _count("Images to generate; each is priced per image."),
                       "size": {"type": "string"},
                       "response_format": {"type": "string", "enum": ["url", "b64_json"]}}},
    "SpeechRequest": {
        "type": "object", "required": ["model", "input"], "additionalProperties": True,
        "properties": {"model": MODEL, "input": {"type": "string", "minLength": 1},
                       "voice": {"type": "string"},
                       "response_format": {"type": "string"}}},
    "AudioUpload": {
        "type": "object", "required": ["model", "file"],
        "properties": {"model": MODEL, "file": {"type": "string", "format": "binary"},
                       "language": {"type": "string"}, "prompt": {"type": "string"},
                       "response_format": {"type": "string",
                                           "enum": ["json", "text", "verbose_json"]}}},
    "AnthropicBlock": {"type": "object", "required": ["type"], "additionalProperties": True,
                       "properties": {"type": {"type": "string"},
                                      "text": {"type": "string"}}},
    "AnthropicMessage": {
        "type": "object", "required": ["role", "content"], "additionalProperties": True,
        "properties": {
            "role": {"type": "string", "enum": ["user", "assistant"]},
            "content": {"oneOf": [{"type": "string"},
                                  {"type": "array", "items": _ref("AnthropicBlock")}]}}},
    "MessagesRequest": {
        "type": "object", "required": ["model", "messages", "max_tokens"],
        "additionalProperties": True,
        "properties": {
            "model": MODEL,
            "messages": {"type": "array", "minItems": 1, "items": _ref("AnthropicMessage")},
            "max_tokens": {"type": "integer", "minimum": 1, "maximum": INT32},
            "system": {"oneOf": [{"type": "string"},
                                 {"type": "array", "items": _ref("AnthropicBlock")}]},
            "tools": {"type": "array", "items": {
                "type": "object", "required": ["name"], "additionalProperties": True,
                "properties": {"name": {"type": "string"}, "description": {"type": "string"},
                               "input_schema": OBJECT}}},
            "tool_choice": {"type": "object", "required": ["type"], "properties": {
                "type": {"type": "string", "enum": ["auto", "any", "tool", "none"]},
                "name": {"type": "string"}}},
            "stop_sequences": {"type": "array", "items": {"type": "string"}},
            "metadata": {"type": "object", "properties": {"user_id": {"type": "string"}}},
            "stream": STREAM,
            "temperature": {"type": "number", "minimum": 0, "maximum": 1}}},
    "ModelObject": {"type": "object", "required": ["id"], "additionalProperties": True,
                    "properties": {"id": {"type": "string"}}},
}

# Which statuses each kind of route can answer besides 200 (SPEC §5 table).
RELAY_ERRORS = ("400", "401", "402", "403", "404", "413", "429", "500", "502", "503", "504")
ERROR_TEXT = {
    "400": "Malformed JSON or a missing / invalid field (`invalid_request_error`).",
    "401": "Missing, unknown, disabled or expired key.",
    "402": "The wallet, the key's credit limit or a budget cannot cover the hold.",
    "403": "The key or its group may not use this model, or the IP is not allowed.",
    "404": "No channel serves this model.",
    "413": "Body over the size limit.",
    "429": "Rate or concurrency limit; every upstream rate-limited (with Retry-After).",
    "500": "Gateway fault or upstream failure on every channel tried.",
    "502": "The upstream answered badly on every channel tried.",
    "503": "No upstream could be reached, or the database is unreachable.",
    "504": "The upstream did not answer in time.",
}


def _errors(statuses, anthropic=False):
    schema = _ref("AnthropicError" if anthropic else "OpenAIError")
    return {status: {"description": ERROR_TEXT[status],
                     "content": {"application/json": {"schema": schema}}}
            for status in statuses}


def _json_body(schema_name):
    return {"required": True, "content": {"application/json": {"schema": _ref(schema_name)}}}


def _relay_post(summary, schema_name, ok_content, anthropic=False, body=None):
    responses = {"200": {"description": "The upstream's answer, in this route's format.",
                         "content": ok_content}}
    responses.update(_errors(RELAY_ERRORS, anthropic))
    return {"post": {"summary": summary, "requestBody": body or _json_body(schema_name),
                     "responses": responses}}


SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
             "description": "One server-sent event (data is JSON, or [DONE])."}
JSON_OR_SSE = {"application/json": {"schema": OBJECT},
               "text/event-stream": {"schema": SSE_EVENT}}
JSON_ONLY = {"application/json": {"schema": OBJECT}}
MULTIPART = {"required": True, "content": {"multipart/form-data": {
    "schema": _ref("AudioUpload"), "encoding": {"file": {"contentType": "audio/*"}}}}}


def _get(summary, ok_schema, errors=("401",), parameters=None):
    operation = {"summary": summary, "responses": {
        "200": {"description": "OK", "content": {"application/json": {"schema": ok_schema}}},
        **_errors(errors)}}
    if parameters:
        operation["parameters"] = parameters
    return {"get": operation}


PATHS = {
    "/v1/chat/completions": _relay_post("OpenAI chat completion, stream or not",
                                        "ChatCompletionRequest", JSON_OR_SSE),
    "/v1/completions": _relay_post("Legacy text completion", "CompletionRequest", JSON_OR_SSE),
    "/v1/embeddings": _relay_post("Embeddings", "EmbeddingRequest", JSON_ONLY),
    "/v1/responses": _relay_post("OpenAI Responses API, stream or not", "ResponsesRequest",
                                 JSON_OR_SSE),
    "/v1/images/generations": _relay_post("Image generation", "ImageRequest", JSON_ONLY),
    "/v1/audio/speech": _relay_post("Text to speech; binary audio streamed through",
                                    "SpeechRequest",
                                    {"audio/mpeg": {"schema": {"type": "string",
                                                               "format": "binary"}},
                                     "application/octet-stream": {"schema": {
                                         "type": "string", "format": "binary"}}}),
    "/v1/audio/transcriptions": _relay_post(
        "Speech to text (multipart upload)", None,
        {"application/json": {"schema": OBJECT}, "text/plain": {"schema": {"type": "string"}}},
        body=MULTIPART),
    "/v1/audio/translations": _relay_post(
        "Speech to English text (multipart upload)", None,
        {"application/json": {"schema": OBJECT}, "text/plain": {"schema": {"type": "string"}}},
        body=MULTIPART),
    "/v1/messages": _relay_post("Anthropic Messages API, to any channel type",
                                "MessagesRequest", JSON_OR_SSE, anthropic=True),
    "/v1/messages/count_tokens": {"post": {
        "summary": "Local input-token count for a Messages request (free, not logged)",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            **deepcopy(SCHEMAS["MessagesRequest"]),
            "required": ["model", "messages"]}}}},
        "responses": {"200": {"description": "The count", "content": {"application/json": {
            "schema": {"type": "object", "required": ["input_tokens"],
                       "properties": {"input_tokens": {"type": "integer", "minimum": 0}}}}}},
            **_errors(("400", "401", "403", "404", "413", "429", "503"), anthropic=True)}}},
    "/v1/models": _get("The models this key may use", {
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "array", "items": _ref("ModelObject")}}},
        errors=("401", "429", "503")),
    "/v1/models/{model_id}": _get("One model this key may use", _ref("ModelObject"),
                                  errors=("401", "404", "429", "503"), parameters=[
        {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}]),
    "/v1/dashboard/billing/subscription": _get(
        "Legacy OpenAI balance: hard_limit_usd = balance + spent (1 credit = 1 unit)",
        {"type": "object", "required": ["hard_limit_usd"],
         "properties": {"hard_limit_usd": {"type": "number"}}}, errors=("401", "429", "503")),
    "/v1/dashboard/billing/usage": _get(
        "Legacy OpenAI usage: total_usage in hundredths of a credit",
        {"type": "object", "required": ["total_usage"],
         "properties": {"total_usage": {"type": "number"}}},
        errors=("400", "401", "429", "503"), parameters=[
            {"name": "start_date", "in": "query", "schema": {"type": "string",
                                                             "format": "date"}},
            {"name": "end_date", "in": "query", "schema": {"type": "string",
                                                           "format": "date"}}]),
}


def openapi_document(server_url="/"):
    """The whole OpenAPI 3.0 document (a fresh dict: callers may change their copy)."""
    paths = deepcopy(PATHS)
    for path, item in paths.items():
        for operation in item.values():
            operation["security"] = [{"bearer": []}, {"x-api-key": []}]
            operation["operationId"] = (operation.get("operationId") or
                                        path.strip("/").replace("/", "_").replace("{", "")
                                        .replace("}", "") + "_" + next(iter(item)))
    return {
        "openapi": "3.0.3",
        "info": {"title": "TokenOpen /v1 API", "version": "1",
                 "description": "OpenAI- and Anthropic-compatible gateway. Errors on OpenAI "
                                "routes: {error: {message, type, param, code}}; on "
                                "/v1/messages: {type: error, error: {type, message}}. Every "
                                "response carries x-request-id."},
        "servers": [{"url": server_url}],
        "paths": paths,
        "components": {
            "schemas": deepcopy(SCHEMAS),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "Authorization: Bearer sk-..."},
                "x-api-key": {"type": "apiKey", "in": "header", "name": "x-api-key"}}},
    }
