//! Text around the decoder: the tokenizer and chat template (from GGUF metadata or a Hugging
//! Face directory), streaming
//! detokenization that never splits a UTF-8 character, and stop-string matching.

use std::collections::HashMap;
use std::path::Path;

use mlx_rs::io::GgufFile;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use anyhow::{Context, anyhow};

use super::Res;
use super::chat::{self, ChatTemplate};

/// GGUF `tokenizer.ggml.token_type` value of control tokens.
const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF `tokenizer.ggml.token_type` value of user-defined tokens.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// A decoder's tokenizer, its special ids and its chat template, from a GGUF file or a Hugging
/// Face directory.
pub(super) struct TextTokenizer {
    pub tokenizer: Tokenizer,
    /// Prepended to raw (non-chat) prompts by [`TextTokenizer::encode`] (GGUF
    /// `add_bos_token`); Hugging Face tokenizers add theirs through `tokenizer.json`'s
    /// post-processor instead, and this is `None`.
    pub bos_for_raw: Option<u32>,
    /// Ids that end generation.
    pub stop_ids: Vec<u32>,
    pub chat: ChatTemplate,
}

fn meta_u32(f: &GgufFile, key: &str) -> Res<Option<u32>> {
    Ok(match f.get_metadata_array(key).with_context(|| key.to_string())? {
        Some(a) => a.to_vec_cast::<i64>().with_context(|| key.to_string())?.first().map(|&v| v as u32),
        None => None,
    })
}

/// A token given in `tokenizer_config.json` as a string or as `{"content": ...}`.
fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Ids in a config's `eos_token_id` (an integer or a list of them).
fn eos_ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => Vec::new(),
    }
}

fn read_json_opt(path: &Path) -> Res<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    Ok(Some(serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?))
}

impl TextTokenizer {
    /// Builds a GPT-2 style byte-level BPE tokenizer from `tokenizer.ggml.*`: BPE over the
    /// vocabulary and merges, pre-tokenizer `Sequence[Digits(individual), ByteLevel(no prefix
    /// space, GPT-2 regex)]`, byte-level decoder, control tokens added as special tokens. The
    /// chat template is `tokenizer.chat_template` (ChatML when absent).
    pub fn from_gguf(f: &GgufFile) -> Res<Self> {
        let model = f
            .get_metadata_string("tokenizer.ggml.model")
            .context("tokenizer.ggml.model")?
            .unwrap_or_default();
        if model != "gpt2" {
            return Err(anyhow!("unsupported GGUF tokenizer model '{model}' (only byte-level BPE, 'gpt2')"));
        }
        let tokens = f
            .get_metadata_strings("tokenizer.ggml.tokens")
            .context("tokenizer.ggml.tokens")?
            .context("GGUF has no tokenizer.ggml.tokens")?;
        let merges = f
            .get_metadata_strings("tokenizer.ggml.merges")
            .context("tokenizer.ggml.merges")?
            .unwrap_or_default();
        let types: Vec<i32> =
            match f.get_metadata_array("tokenizer.ggml.token_type").context("tokenizer.ggml.token_type")? {
                Some(a) => a.to_vec_cast::<i32>().context("token_type")?,
                None => vec![1; tokens.len()],
            };
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .with_context(|| format!("malformed merge '{m}'"))
            })
            .collect::<Res<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(anyhow::Error::from_boxed)
            .context("building BPE")?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ])));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL || **t == TOKEN_TYPE_USER_DEFINED)
            .map(|(tok, t)| AddedToken::from(tok.clone(), *t == TOKEN_TYPE_CONTROL))
            .collect();
        tokenizer
            .add_special_tokens(special)
            .map_err(anyhow::Error::from_boxed)
            .context("adding special tokens")?;

        let by_name: HashMap<&str, u32> =
            tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i as u32)).collect();
        let eos = meta_u32(f, "tokenizer.ggml.eos_token_id")?;
        let bos = meta_u32(f, "tokenizer.ggml.bos_token_id")?;
        let mut stop_ids: Vec<u32> = eos.into_iter().collect();
        for name in ["<|endoftext|>", "<|im_end|>", "<|eot_id|>", "</s>"] {
            if let Some(&id) = by_name.get(name)
                && !stop_ids.contains(&id)
            {
                stop_ids.push(id);
            }
        }
        let template = f.get_metadata_string("tokenizer.chat_template").context("tokenizer.chat_template")?;
        let add_bos = match f.get_metadata_array("tokenizer.ggml.add_bos_token").context("add_bos_token")? {
            Some(a) => a.to_vec_cast::<i32>().context("add_bos_token")?.first() == Some(&1),
            None => false,
        };
        let name_of = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize)).cloned().unwrap_or_default();
        let chat = ChatTemplate::new(
            template.as_deref().unwrap_or(chat::CHATML),
            vec![("bos_token", name_of(bos)), ("eos_token", name_of(eos))],
        )
        .context("GGUF tokenizer.chat_template")?;
        Ok(TextTokenizer { tokenizer, bos_for_raw: if add_bos { bos } else { None }, stop_ids, chat })
    }

    /// Reads a Hugging Face directory's `tokenizer.json` (required), `tokenizer_config.json`
    /// (`chat_template` as a string or a list of named templates, where `default` wins;
    /// `bos_token` / `eos_token`), `chat_template.jinja` or else `chat_template.json` (used
    /// when the config has no template), and the end-of-sequence ids: `generation_config.json`'s `eos_token_id` (an
    /// integer or a list), else `config.json`'s, plus the id of `eos_token`. Without any
    /// template, ChatML.
    pub fn from_hf_dir(dir: &Path, config: &serde_json::Value) -> Res<Self> {
        Self::from_dir(dir, config, false)
    }

    /// As [`TextTokenizer::from_hf_dir`] for a vision-language directory: the processor's
    /// template (`chat_template.jinja` or `chat_template.json`) wins over the tokenizer's.
    pub fn from_hf_vlm_dir(dir: &Path, config: &serde_json::Value) -> Res<Self> {
        Self::from_dir(dir, config, true)
    }

    fn from_dir(dir: &Path, config: &serde_json::Value, processor: bool) -> Res<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.is_file() {
            return Err(anyhow!("{} is missing (the model's tokenizer)", tj.display()));
        }
        let tokenizer = Tokenizer::from_file(&tj)
            .map_err(anyhow::Error::from_boxed)
            .with_context(|| tj.display().to_string())?;
        let tc_path = dir.join("tokenizer_config.json");
        let tc = read_json_opt(&tc_path)?.unwrap_or(serde_json::Value::Null);
        let mut template = match tc.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => {
                let named = |n: &str| {
                    list.iter()
                        .find(|t| t.get("name").and_then(|x| x.as_str()) == Some(n))?
                        .get("template")?
                        .as_str()
                };
                Some(
                    named("default")
                        .or_else(|| list.first()?.get("template")?.as_str())
                        .map(str::to_string)
                        .with_context(|| {
                            format!("{}: chat_template list has no template", tc_path.display())
                        })?,
                )
            }
            _ => None,
        };
        // A processor's template (vision-language directories) wins over the tokenizer's, as
        // mlx-vlm's `load_chat_template` does: `chat_template.json`, then
        // `chat_template.jinja`; for a text model, `chat_template.jinja` first.
        let jinja = dir.join("chat_template.jinja");
        let processor_json = dir.join("chat_template.json");
        let json_first = processor && processor_json.is_file();
        if (template.is_none() || processor) && jinja.is_file() && !json_first {
            template = Some(std::fs::read_to_string(&jinja).with_context(|| jinja.display().to_string())?);
        } else if (template.is_none() || processor) && processor_json.is_file() {
            let v = read_json_opt(&processor_json)?.unwrap_or(serde_json::Value::Null);
            let t = v
                .get("chat_template")
                .and_then(|t| t.as_str())
                .with_context(|| format!("{}: no \"chat_template\" string", processor_json.display()))?;
            template = Some(t.to_string());
        }
        let mut tokens = Vec::new();
        for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            if let Some(s) = token_string(tc.get(key)) {
                tokens.push((key, s));
            }
        }
        let generation = read_json_opt(&dir.join("generation_config.json"))?;
        let mut stop_ids = eos_ids(generation.as_ref().and_then(|g| g.get("eos_token_id")));
        if stop_ids.is_empty() {
            stop_ids = eos_ids(config.get("eos_token_id"));
        }
        if let Some(id) = token_string(tc.get("eos_token")).and_then(|s| tokenizer.token_to_id(&s))
            && !stop_ids.contains(&id)
        {
            stop_ids.push(id);
        }
        if stop_ids.is_empty() {
            return Err(anyhow!(
                "{}: no end-of-sequence id (generation_config.json / config.json eos_token_id, tokenizer_config.json eos_token)",
                dir.display()
            ));
        }
        let what = if template.is_some() { "the chat template" } else { "ChatML" };
        let chat = ChatTemplate::new(template.as_deref().unwrap_or(chat::CHATML), tokens)
            .with_context(|| format!("{}: {what}", dir.display()))?;
        Ok(TextTokenizer { tokenizer, bos_for_raw: None, stop_ids, chat })
    }

    /// Token ids of `text`. Chat text (already rendered by the template, which writes its own
    /// special tokens) is encoded without the tokenizer's added special tokens; raw text with
    /// them (and the GGUF BOS when the file asks for one).
    pub fn encode(&self, text: &str, is_chat: bool) -> Res<Vec<u32>> {
        let enc =
            self.tokenizer.encode(text, !is_chat).map_err(anyhow::Error::from_boxed).context("tokenizing")?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if !is_chat {
            ids.extend(self.bos_for_raw);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }
}

/// Turns a growing list of token ids into text pieces without ever cutting a UTF-8 character:
/// bytes of an unfinished character (decoded as U+FFFD) are held until it completes.
pub(super) struct StreamDecoder {
    ids: Vec<u32>,
    /// Start of the window decoded for context (so leading-space handling stays right).
    prefix: usize,
    /// Ids before this have been emitted.
    read: usize,
}

impl StreamDecoder {
    pub fn new() -> Self {
        StreamDecoder { ids: Vec::new(), prefix: 0, read: 0 }
    }

    /// Adds one id; returns the newly completed text, possibly empty.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Res<String> {
        self.ids.push(id);
        let before = tok
            .decode(&self.ids[self.prefix..self.read], true)
            .map_err(anyhow::Error::from_boxed)
            .context("detokenizing")?;
        let after = tok
            .decode(&self.ids[self.prefix..], true)
            .map_err(anyhow::Error::from_boxed)
            .context("detokenizing")?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            let piece = after.get(before.len()..).map(str::to_string).unwrap_or_default();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }
}

/// Holds back generated text that might be the start of a stop string, and finds stops.
pub(super) struct StopMatcher {
    stops: Vec<String>,
    text: String,
    sent: usize,
}

/// What the matcher lets out after new text arrives.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum StopCheck {
    /// Text safe to emit now (possibly empty).
    Emit(String),
    /// A stop string was found: emit this final text and stop.
    Stop(String),
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            text: String::new(),
            sent: 0,
        }
    }

    pub fn push(&mut self, piece: &str) -> StopCheck {
        self.text.push_str(piece);
        // A stop can only begin in the unsent part, or straddle it by less than its length.
        let max_stop = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.sent.saturating_sub(max_stop);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let found =
            self.stops.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|p| from + p)).min();
        if let Some(pos) = found {
            let out = self.text[self.sent.min(pos)..pos].to_string();
            self.sent = self.text.len();
            return StopCheck::Stop(out);
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if i > hold && self.text.ends_with(&s[..i]) {
                    hold = i;
                }
            }
        }
        let end = (self.text.len() - hold).max(self.sent);
        let out = self.text[self.sent..end].to_string();
        self.sent = end;
        StopCheck::Emit(out)
    }

    /// Text still held back when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        let out = self.text[self.sent..].to_string();
        self.sent = self.text.len();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_matcher_holds_prefixes_and_stops_across_pieces() {
        let mut m = StopMatcher::new(&["\n\nUser:".to_string(), "END".to_string()]);
        assert_eq!(m.push("Hello"), StopCheck::Emit("Hello".into()));
        assert_eq!(m.push(" world\n"), StopCheck::Emit(" world".into()));
        assert_eq!(m.push("\nUs"), StopCheck::Emit(String::new()));
        assert_eq!(m.push("er: hi"), StopCheck::Stop(String::new()));

        let mut m = StopMatcher::new(&["END".to_string()]);
        assert_eq!(m.push("aE"), StopCheck::Emit("a".into()));
        assert_eq!(m.push("x"), StopCheck::Emit("Ex".into()));
        assert_eq!(m.push("yyEN"), StopCheck::Emit("yy".into()));
        assert_eq!(m.flush(), "EN");

        let mut m = StopMatcher::new(&["é!".to_string()]);
        assert_eq!(m.push("café"), StopCheck::Emit("caf".into()));
        assert_eq!(m.push("!x"), StopCheck::Stop(String::new()));
    }

    /// A byte-level BPE without merges: every UTF-8 byte is its own token, so multi-byte
    /// characters arrive in pieces.
    fn byte_tokenizer() -> Tokenizer {
        let mut chars: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        chars.sort();
        let vocab: Vocab = chars.iter().enumerate().map(|(i, c)| (c.to_string(), i as u32)).collect();
        let bpe = BPE::builder().vocab_and_merges(vocab, vec![]).build().unwrap();
        let mut t = Tokenizer::new(bpe);
        t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        t.with_decoder(Some(ByteLevelDecoder::default()));
        t
    }

    #[test]
    fn stream_decoder_never_splits_a_character() {
        let tok = byte_tokenizer();
        let text = "a é 🐉!";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(ids.len(), text.len(), "one token per byte");
        let mut d = StreamDecoder::new();
        let pieces: Vec<String> = ids.iter().map(|&id| d.push(&tok, id).unwrap()).collect();
        assert_eq!(pieces.concat(), text);
        for p in &pieces {
            assert!(!p.contains('\u{FFFD}'), "{pieces:?}");
        }
        // The dragon's 4 bytes yield nothing until the last one.
        let dragon = text.find('🐉').unwrap();
        assert_eq!(pieces[dragon..dragon + 3], ["", "", ""]);
        assert_eq!(pieces[dragon + 3], "🐉");
    }
}
