//! Text around the decoder: the tokenizer and chat template built from GGUF metadata, streaming
//! detokenization that never splits a UTF-8 character, and stop-string matching.

use std::collections::HashMap;

use mlx_rs::io::GgufFile;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use anyhow::{Context, anyhow};

use super::Res;
use crate::backend::ChatMessage;

/// GGUF `tokenizer.ggml.token_type` value of control tokens.
const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF `tokenizer.ggml.token_type` value of user-defined tokens.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// The tokenizer of a GGUF model, with its special ids and chat template.
pub(super) struct GgufTokenizer {
    pub tokenizer: Tokenizer,
    pub bos: Option<u32>,
    pub add_bos: bool,
    /// Ids that end generation (`eos_token_id`, and `<|endoftext|>`/`<|im_end|>` if present).
    pub stop_ids: Vec<u32>,
    pub chat: ChatTemplate,
}

fn meta_u32(f: &GgufFile, key: &str) -> Res<Option<u32>> {
    Ok(match f.get_metadata_array(key).with_context(|| key.to_string())? {
        Some(a) => a.to_vec_cast::<i64>().with_context(|| key.to_string())?.first().map(|&v| v as u32),
        None => None,
    })
}

impl GgufTokenizer {
    /// Builds a GPT-2 style byte-level BPE tokenizer from `tokenizer.ggml.*`: BPE over the
    /// vocabulary and merges, pre-tokenizer `Sequence[Digits(individual), ByteLevel(no prefix
    /// space, GPT-2 regex)]`, byte-level decoder, control tokens added as special tokens.
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
        Ok(GgufTokenizer {
            tokenizer,
            bos: meta_u32(f, "tokenizer.ggml.bos_token_id")?,
            add_bos,
            stop_ids,
            chat: ChatTemplate::from_template(template.as_deref()),
        })
    }

    /// Token ids of `text`; special-token strings in it are recognised as such.
    pub fn encode(&self, text: &str, is_chat: bool) -> Res<Vec<u32>> {
        let enc =
            self.tokenizer.encode(text, false).map_err(anyhow::Error::from_boxed).context("tokenizing")?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos && !is_chat {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }
}

/// The chat format. GGUF ships a Jinja template; rather than embedding a template engine we
/// recognise ChatML (`<|im_start|>role\ncontent<|im_end|>\n`), which covers the models served
/// here, and take the default system prompt the template inserts when there is none.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum ChatTemplate {
    ChatMl { default_system: Option<String> },
}

impl ChatTemplate {
    pub fn from_template(template: Option<&str>) -> Self {
        // Inside the template's string literal the newline may be a real one or `\n`.
        let default_system = template.and_then(|t| {
            let marker = "<|im_start|>system";
            let i = t.find(marker)? + marker.len();
            let rest = &t[i..];
            let body = rest.strip_prefix('\n').or_else(|| rest.strip_prefix("\\n"))?;
            let end = body.find("<|im_end|>")?;
            Some(body[..end].replace("\\n", "\n"))
        });
        ChatTemplate::ChatMl { default_system }
    }

    /// Renders messages and opens the assistant turn.
    pub fn render(&self, messages: &[ChatMessage]) -> String {
        let ChatTemplate::ChatMl { default_system } = self;
        let mut out = String::new();
        if let Some(sys) = default_system
            && messages.first().is_none_or(|m| m.role != "system")
        {
            out.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
        }
        for m in messages {
            out.push_str(&format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content));
        }
        out.push_str("<|im_start|>assistant\n");
        out
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

    #[test]
    fn chatml_default_system_prompt_from_template() {
        let t = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}";
        let c = ChatTemplate::from_template(Some(t));
        let real_newlines = ChatTemplate::from_template(Some(&t.replace("\\n", "\n")));
        assert_eq!(c, real_newlines);
        let msgs =
            vec![ChatMessage { role: "user".into(), content: "What is the capital of France?".into() }];
        assert_eq!(
            c.render(&msgs),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
        let with_sys =
            vec![ChatMessage { role: "system".into(), content: "Be brief.".into() }, msgs[0].clone()];
        assert!(c.render(&with_sys).starts_with("<|im_start|>system\nBe brief.<|im_end|>\n"));
    }
}
