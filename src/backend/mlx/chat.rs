//! Chat templates: the model's own Jinja template (Hugging Face `tokenizer_config.json`
//! `chat_template`, `chat_template.jinja`, or GGUF `tokenizer.chat_template`) rendered with
//! minijinja the way transformers' `apply_chat_template` renders it with jinja2:
//! `trim_blocks` and `lstrip_blocks` on, loop controls, Python string/dict/list methods
//! (minijinja-contrib's pycompat: `.strip()`, `.split()`, `.items()`, `.startswith()`, ...),
//! `raise_exception(msg)`, `strftime_now(fmt)` (local time), and a `tojson` filter that writes
//! what Python's `json.dumps(x, ensure_ascii=False, indent=indent)` writes. The context holds
//! `messages` (`role`, `content`), `add_generation_prompt`, `bos_token`, `eos_token` (plus
//! `pad_token` / `unk_token` when known).

use std::collections::BTreeMap;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};

use anyhow::Context;

use super::Res;
use crate::backend::{ChatMessage, ContentPiece};

/// ChatML, used when a model ships no template (the format SmolLM2 and Qwen use).
pub(super) const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A compiled chat template and the special-token strings it may refer to.
pub(super) struct ChatTemplate {
    env: Environment<'static>,
    /// `(name, string)` pairs passed to the template (`bos_token`, `eos_token`, ...).
    tokens: Vec<(&'static str, String)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("tokens", &self.tokens).finish_non_exhaustive()
    }
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(fmt)`: the local time formatted by the C library's `strftime` (Python's
/// `datetime.now().strftime`, which transformers exposes, uses the same directives).
fn strftime_now(fmt: String) -> Result<String, Error> {
    let cfmt = std::ffi::CString::new(fmt)
        .map_err(|_| Error::new(ErrorKind::InvalidOperation, "strftime_now: NUL in format"))?;
    // SAFETY: time/localtime_r/strftime with valid pointers and a sized buffer.
    unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return Err(Error::new(ErrorKind::InvalidOperation, "strftime_now: no local time"));
        }
        let mut buf = [0u8; 256];
        let n = libc::strftime(buf.as_mut_ptr().cast(), buf.len(), cfmt.as_ptr(), &tm);
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

/// Python's `json.dumps(v, ensure_ascii=False, indent=indent)`: `", "` and `": "` separators
/// without indent, `","` and newlines with it; map keys in the template's insertion order
/// (minijinja's `preserve_order`).
pub(super) fn python_json(v: &Value, indent: Option<usize>) -> Result<String, Error> {
    fn go(v: &Value, indent: Option<usize>, depth: usize, out: &mut String) -> Result<(), Error> {
        let nl = |out: &mut String, d: usize| {
            if let Some(n) = indent {
                out.push('\n');
                out.push_str(&" ".repeat(n * d));
            }
        };
        let sep = if indent.is_some() { "," } else { ", " };
        let string = |s: &str| serde_json::to_string(s).unwrap_or_default();
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if v.is_integer() {
                    out.push_str(&v.to_string());
                } else {
                    let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                    // Python prints floats with a fractional part (1.0, not 1).
                    if f.fract() == 0.0 && f.abs() < 1e16 {
                        out.push_str(&format!("{f:.1}"));
                    } else {
                        out.push_str(&f.to_string());
                    }
                }
            }
            ValueKind::String => out.push_str(&string(v.as_str().unwrap_or_default())),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                out.push('[');
                for (i, x) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(sep);
                    }
                    nl(out, depth + 1);
                    go(x, indent, depth + 1, out)?;
                }
                if !items.is_empty() {
                    nl(out, depth);
                }
                out.push(']');
            }
            ValueKind::Map => {
                let keys: Vec<Value> = v.try_iter()?.collect();
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(sep);
                    }
                    nl(out, depth + 1);
                    out.push_str(&string(&k.to_string()));
                    out.push_str(": ");
                    go(&v.get_item(k)?, indent, depth + 1, out)?;
                }
                if !keys.is_empty() {
                    nl(out, depth);
                }
                out.push('}');
            }
            _ => out.push_str(&string(&v.to_string())),
        }
        Ok(())
    }
    let mut out = String::new();
    go(v, indent, 0, &mut out)?;
    Ok(out)
}

/// `x | tojson` and `x | tojson(indent=n)`.
fn tojson(v: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    Ok(Value::from_safe_string(python_json(&v, indent)?))
}

impl ChatTemplate {
    /// Compiles `source`. `tokens` are the special-token strings the template may use
    /// (`bos_token`, `eos_token`, ...). Errors when the template does not parse.
    pub fn new(source: &str, tokens: Vec<(&'static str, String)>) -> Res<ChatTemplate> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .context("template syntax")?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string()).context("parsing the chat template")?;
        Ok(ChatTemplate { env, tokens })
    }

    /// Renders `messages`; with `add_generation_prompt` the assistant's turn is opened. Errors
    /// carry the template's own message (e.g. a `raise_exception` about role order).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Res<String> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from(BTreeMap::from([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ]))
            })
            .collect();
        self.render_values(msgs, add_generation_prompt)
    }

    /// Renders `messages` with every message's content as a list of parts, the way
    /// vision-language processors call their templates: `{"type": "text", "text": ...}` and
    /// `{"type": "image"}` in the client's order (a text-only message is one text part).
    pub fn render_parts(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Res<String> {
        let text =
            |t: &str| Value::from(BTreeMap::from([("type", Value::from("text")), ("text", Value::from(t))]));
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                let parts: Vec<Value> = if m.pieces.is_empty() {
                    vec![text(&m.content)]
                } else {
                    m.pieces
                        .iter()
                        .map(|p| match p {
                            ContentPiece::Text(t) => text(t),
                            ContentPiece::Image(_) => {
                                Value::from(BTreeMap::from([("type", Value::from("image"))]))
                            }
                        })
                        .collect()
                };
                Value::from(BTreeMap::from([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(parts)),
                ]))
            })
            .collect();
        self.render_values(msgs, add_generation_prompt)
    }

    fn render_values(&self, msgs: Vec<Value>, add_generation_prompt: bool) -> Res<String> {
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::from([
            ("messages", Value::from(msgs)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ]);
        for (k, v) in &self.tokens {
            ctx.insert(k, Value::from(v.as_str()));
        }
        let tmpl = self.env.get_template("chat").context("chat template")?;
        tmpl.render(Value::from(ctx)).map_err(|e| {
            let detail = e.detail().map(str::to_string).unwrap_or_else(|| e.to_string());
            anyhow::anyhow!("chat template: {detail}")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage::text(role, content)
    }

    #[test]
    fn chatml_fallback_renders_turns() {
        let t = ChatTemplate::new(CHATML, vec![]).unwrap();
        let out = t.render(&[msg("system", "S"), msg("user", "hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(!t.render(&[msg("user", "hi")], false).unwrap().ends_with("assistant\n"));
    }

    #[test]
    fn helpers_hf_templates_call() {
        let src = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system: ' + messages[0]['content'].strip()) }}{% endif %}{{ bos_token }}{{ messages[0]['content'].upper() }}|{{ strftime_now('%Y') | length }}|{{ {'a': [1, 2.0], 'b': 'é'} | tojson }}";
        let t = ChatTemplate::new(src, vec![("bos_token", "<s>".into())]).unwrap();
        assert_eq!(t.render(&[msg("user", "hi")], true).unwrap(), "<s>HI|4|{\"a\": [1, 2.0], \"b\": \"é\"}");
        let e = t.render(&[msg("system", "  x ")], true).unwrap_err().to_string();
        assert!(e.contains("no system: x"), "{e}");
        assert!(ChatTemplate::new("{% if %}", vec![]).is_err());
    }

    #[test]
    fn tojson_writes_what_json_dumps_writes() {
        let t = ChatTemplate::new(
            "{{ {'name': 'f', 'args': {'x': [1, true, none, 2.5]}, 'e': {}} | tojson }}|{{ {'a': [1]} | tojson(indent=2) }}",
            vec![],
        )
        .unwrap();
        assert_eq!(
            t.render(&[], false).unwrap(),
            "{\"name\": \"f\", \"args\": {\"x\": [1, true, null, 2.5]}, \"e\": {}}|{\n  \"a\": [\n    1\n  ]\n}"
        );
    }

    /// minijinja's rendering equals transformers' jinja2 rendering
    /// (`tests/fixtures/chat_templates.json`, scripts/make-chat-template-reference.py) for
    /// SmolLM2's template and the family shapes (ChatML, Llama 3, Gemma, Mistral, Phi), with a
    /// system prompt, multi-turn, and with and without the generation prompt.
    #[test]
    fn renders_as_transformers_does() {
        let p = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/chat_templates.json");
        let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        let cases = fixture["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 24);
        for c in cases {
            let tokens: Vec<(&'static str, String)> = ["bos_token", "eos_token"]
                .into_iter()
                .map(|k| (k, c["tokens"][k].as_str().unwrap().to_string()))
                .collect();
            let t = ChatTemplate::new(c["template"].as_str().unwrap(), tokens).unwrap();
            let msgs: Vec<ChatMessage> = c["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| msg(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
                .collect();
            let agp = c["add_generation_prompt"].as_bool().unwrap();
            let got = t.render(&msgs, agp).unwrap();
            assert_eq!(
                got,
                c["expected"].as_str().unwrap(),
                "{} (agp {agp}, {} messages)",
                c["template_name"],
                msgs.len()
            );
        }
        // Gemma's template refuses roles out of order with its own message.
        let gemma = cases.iter().find(|c| c["template_name"] == "gemma").unwrap();
        let t = ChatTemplate::new(gemma["template"].as_str().unwrap(), vec![]).unwrap();
        let e = t.render(&[msg("assistant", "x")], true).unwrap_err().to_string();
        assert!(e.contains("Conversation roles must alternate"), "{e}");
    }
}
