//! The OpenAPI 3.1 document served at `/openapi.json`. Intervention parameter schemas come
//! from the interventions catalogue, so the document follows the implemented methods.

use serde_json::{json, Map, Value};

pub fn document() -> Value {
    let error = |description: &str| json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let generation_errors = json!({
        "400": error("Invalid request; `param` names the field"),
        "401": error("Missing or invalid API key"),
        "404": error("Unknown model"),
        "413": error("Request body too large"),
        "429": error("Queue full; see the Retry-After header"),
        "503": error("Model loading, request timed out, or shutting down"),
    });
    let generation = |summary: &str, request: &str, response: &str| {
        let mut responses = generation_errors.as_object().cloned().unwrap_or_default();
        responses.insert(
            "200".into(),
            json!({
                "description": "The completion, or with `stream: true` server-sent events of chunks ending with `data: [DONE]`",
                "content": {
                    "application/json": {"schema": {"$ref": format!("#/components/schemas/{response}")}},
                    "text/event-stream": {"schema": {"type": "string"}},
                },
            }),
        );
        json!({"post": {
            "summary": summary,
            "security": [{"bearer": []}, {}],
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{request}")}}}},
            "responses": responses,
        }})
    };
    let utility = |summary: &str, request: &str, response: Value| {
        json!({"post": {
            "summary": summary,
            "security": [{"bearer": []}, {}],
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{request}")}}}},
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": response}}},
                "400": error("Invalid request; `param` names the field"),
                "401": error("Missing or invalid API key"),
                "404": error("Unknown model"),
            },
        }})
    };
    let simple = |summary: &str, content_type: &str, schema: Value, open: bool| {
        let mut op = json!({"get": {
            "summary": summary,
            "responses": {"200": {"description": "OK", "content": {content_type: {"schema": schema}}}},
        }});
        if !open {
            op["get"]["security"] = json!([{"bearer": []}, {}]);
            op["get"]["responses"]["401"] = error("Missing or invalid API key");
        }
        op
    };
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Attune",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "OpenAI-compatible inference with per-request interventions.",
        },
        "paths": {
            "/health": simple("Liveness", "application/json", json!({"type": "object"}), true),
            "/ready": simple("Readiness: 200 once every model is loaded, 503 before", "application/json", json!({"type": "object"}), false),
            "/metrics": simple("Prometheus metrics", "text/plain", json!({"type": "string"}), true),
            "/openapi.json": simple("This document", "application/json", json!({"type": "object"}), false),
            "/v1/models": simple("Configured models", "application/json", json!({"$ref": "#/components/schemas/ModelList"}), false),
            "/v1/models/{id}": {"get": {
                "summary": "One model",
                "security": [{"bearer": []}, {}],
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": {
                    "200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Model"}}}},
                    "404": error("Unknown model"),
                },
            }},
            "/v1/interventions": simple("Intervention catalogue", "application/json", json!({"type": "object"}), false),
            "/v1/chat/completions": generation("Chat completion", "ChatCompletionRequest", "ChatCompletion"),
            "/v1/completions": generation("Text completion", "CompletionRequest", "Completion"),
            "/tokenize": utility("Token ids of a prompt, or of chat messages through the chat template (vLLM's shape)", "TokenizeRequest", json!({"type": "object", "properties": {
                "tokens": {"type": "array", "items": {"type": "integer"}}, "count": {"type": "integer"}, "max_model_len": {"type": "integer"},
            }})),
            "/detokenize": utility("Text of token ids (vLLM's shape)", "DetokenizeRequest", json!({"type": "object", "properties": {"prompt": {"type": "string"}}})),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas(),
        },
    })
}

fn schemas() -> Value {
    let sampling = json!({
        "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 1},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1},
        "top_k": {"type": "integer", "minimum": -1, "default": 0, "description": "0 or -1: off"},
        "min_p": {"type": "number", "minimum": 0, "maximum": 1, "default": 0},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2, "default": 0},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2, "default": 0},
        "repetition_penalty": {"type": "number", "exclusiveMinimum": 0, "maximum": 10, "default": 1},
        "seed": {"type": "integer"},
        "n": {"type": "integer", "minimum": 1, "default": 1},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "logit_bias": {"type": "object", "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
        "stream": {"type": "boolean", "default": false},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "interventions": {"type": "array", "items": {"$ref": "#/components/schemas/Intervention"}},
        "score_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}, "uniqueItems": true,
            "description": "Token ids whose log-probabilities at the first generated position (after interventions, before sampling penalties) come back in each choice's `token_scores`"},
        "model": {"type": "string"},
    });
    let with = |extra: Value, required: &[&str]| {
        let mut props = sampling.as_object().cloned().unwrap_or_default();
        props.extend(extra.as_object().cloned().unwrap_or_default());
        json!({"type": "object", "required": required, "properties": props})
    };
    let usage = json!({"type": "object", "properties": {
        "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"},
    }});
    let finish = json!({"enum": ["stop", "length", null]});
    let messages = json!({"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role"], "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant"]},
        "content": {"oneOf": [
            {"type": "string"},
            {"type": "array", "items": {"oneOf": [
                {"type": "object", "required": ["type", "text"], "properties": {"type": {"const": "text"}, "text": {"type": "string"}}},
                {"type": "object", "required": ["type", "image_url"], "description": "Vision-language models only; a base64 `data:image/...` URL (PNG, JPEG, WebP, GIF), within the server's image limits",
                 "properties": {"type": {"const": "image_url"}, "image_url": {"type": "object", "required": ["url"], "properties": {"url": {"type": "string"}, "detail": {"type": "string"}}}}},
            ]}},
            {"type": "null"},
        ]},
    }}});
    let scores = json!({"type": "array", "description": "With `score_token_ids`", "items": {"type": "object", "properties": {
        "token_id": {"type": "integer"}, "token": {"type": "string"}, "logprob": {"type": "number"},
    }}});
    let report = json!({"type": "object", "description": "Present when an intervention chose \
        something per prompt, by method name (e.g. zerotuning auto: gamma, grid, entropy)"});
    json!({
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }}},
        "Model": {"type": "object", "properties": {
            "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"}, "owned_by": {"type": "string"},
        }},
        "ModelList": {"type": "object", "properties": {
            "object": {"const": "list"}, "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
        }},
        "Intervention": intervention_schema(),
        "ChatCompletionRequest": with(json!({
            "messages": messages,
            "max_tokens": {"type": "integer", "minimum": 1},
            "max_completion_tokens": {"type": "integer", "minimum": 1},
            "logprobs": {"type": "boolean", "default": false},
            "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        }), &["messages"]),
        "TokenizeRequest": {"type": "object", "properties": {
            "model": {"type": "string"},
            "prompt": {"type": "string"},
            "messages": messages,
            "add_special_tokens": {"type": "boolean", "default": true, "description": "For `prompt`: add the BOS token if the model uses one"},
        }, "description": "Exactly one of `prompt` or `messages`"},
        "DetokenizeRequest": {"type": "object", "required": ["tokens"], "properties": {
            "model": {"type": "string"},
            "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        }},
        "CompletionRequest": with(json!({
            "prompt": {"oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}},
                {"type": "array", "items": {"type": "integer", "minimum": 0}},
                {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}}},
            ]},
            "max_tokens": {"type": "integer", "minimum": 1, "default": 16},
            "logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        }), &["prompt"]),
        "ChatCompletion": {"type": "object", "properties": {
            "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"}, "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object", "properties": {
                "index": {"type": "integer"},
                "message": {"type": "object", "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}},
                "logprobs": {"type": ["object", "null"]},
                "finish_reason": finish,
                "intervention_report": report,
                "token_scores": scores,
            }}},
            "usage": usage,
            "interventions": {"type": "array", "items": {"type": "object"}, "description": "The interventions with every default filled in"},
        }},
        "Completion": {"type": "object", "properties": {
            "id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"}, "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object", "properties": {
                "index": {"type": "integer"}, "text": {"type": "string"}, "logprobs": {"type": ["object", "null"]}, "finish_reason": finish,
                "intervention_report": report,
                "token_scores": scores,
            }}},
            "usage": usage,
            "interventions": {"type": "array", "items": {"type": "object"}},
        }},
    })
}

/// One schema per implemented method, built from the catalogue.
fn intervention_schema() -> Value {
    let variants: Vec<Value> = attune_interventions::catalogue()
        .into_iter()
        .filter(|m| m.implemented)
        .map(|m| {
            let mut props = Map::new();
            props.insert("type".into(), json!({"const": m.name}));
            for p in &m.parameters {
                let mut schema = p.schema.clone();
                schema["description"] = json!(p.description);
                props.insert(p.name.into(), schema);
            }
            json!({
                "type": "object",
                "description": m.description,
                "required": ["type"],
                "additionalProperties": false,
                "properties": props,
            })
        })
        .collect();
    json!({"oneOf": variants})
}
