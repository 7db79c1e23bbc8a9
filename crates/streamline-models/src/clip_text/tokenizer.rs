//! CLIP's tokenizer as diffusers runs it for SD 1.5 / AnimateDiff: transformers' slow
//! `CLIPTokenizer` (the pipelines name that class, and SD 1.5 repos ship only vocab.json and
//! merges.txt), called with `padding="max_length", truncation=True`.
//!
//! Without ftfy installed, that tokenizer cleans text with `BasicTokenizer(strip_accents=False,
//! do_split_on_punc=False)`: control and format characters dropped, whitespace runs collapsed,
//! spaces put around CJK ideographs, NFC, then Python's `str.lower` per word. The fast tokenizer
//! (tokenizer.json) normalizes differently (it keeps control characters, runs CJK ideographs
//! together and lowercases character by character), so this module does the slow cleaning in
//! Rust and hands the result to a `tokenizers` pipeline for the byte-level BPE. For text the
//! two agree on the cleaning is a no-op for the fast pipeline, and for the rest it makes the
//! fast files give the slow tokenizer's ids, which is what diffusers conditions on.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::utils::SysRegex;
use tokenizers::{AddedToken, NormalizedString, SplitDelimiterBehavior, Tokenizer};

use crate::load::ModelError;

/// `CLIPTokenizer` reads at most this many merges (49152 - 256 - 2), whatever the file holds.
const MAX_MERGES: usize = 48_894;

/// `CLIPTokenizer`'s pre-tokenization. Its two special-token alternatives are left to the
/// added vocabulary, which matches the same strings first.
const WORDS: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// What `BasicTokenizer._clean_text` drops: NUL, U+FFFD and every character whose Unicode
/// category starts with C (control, format, private use, unassigned), but tab, LF and CR.
const DROPPED: &str = r"[[\p{C}\x{FFFD}]&&[^\t\n\r]]";

/// What truncation cut off the end of a prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncation {
    /// The removed token ids (the end token, which is always kept, not among them).
    pub ids: Vec<u32>,
    /// Those tokens decoded, as diffusers prints them in its warning.
    pub text: String,
}

/// One prompt's ids, ready for the text encoder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClipEncoding {
    /// Exactly `model_max_length` ids: start token, prompt, end token, pad tokens.
    pub ids: Vec<u32>,
    /// `Some` when the prompt did not fit.
    pub truncated: Option<Truncation>,
}

/// transformers' `CLIPTokenizer` with diffusers' call: ids padded and truncated to
/// `model_max_length` (77 for SD 1.5).
#[derive(Clone, Debug)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    dropped: Arc<SysRegex>,
    bos: u32,
    eos: u32,
    pad: u32,
    max_length: usize,
    clean_up_spaces: bool,
    dir: PathBuf,
}

impl ClipTokenizer {
    /// Load a tokenizer folder: `tokenizer.json` when there is one, else `vocab.json` and
    /// `merges.txt` built into CLIP's byte-level BPE (`</w>` word ends). Special tokens, the
    /// pad token and `model_max_length` (default 77) come from `tokenizer_config.json` and
    /// `special_tokens_map.json`, resolved as transformers' `from_pretrained` does.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let settings = Settings::load(dir)?;
        let json = dir.join("tokenizer.json");
        let mut tokenizer = if json.is_file() {
            Tokenizer::from_file(&json).map_err(|e| config_error(&json, e))?
        } else {
            bpe_tokenizer(dir, &settings.unk)?
        };
        // ids are truncated and padded below, as transformers' Python code does it.
        tokenizer
            .with_truncation(None)
            .map_err(|e| config_error(dir, e))?;
        tokenizer.with_padding(None);
        let config = dir.join("tokenizer_config.json");
        for token in settings.added {
            let added = if token.special {
                tokenizer.add_special_tokens([token])
            } else {
                tokenizer.add_tokens([token])
            };
            added.map_err(|e| config_error(&config, e))?;
        }
        for (id, token) in &settings.added_ids {
            let got = tokenizer.token_to_id(&token.content);
            if got != Some(*id) {
                return Err(ModelError::Config {
                    path: config.clone(),
                    reason: format!(
                        "added token {:?} has id {id} there but {got:?} in the vocabulary",
                        token.content
                    ),
                });
            }
        }
        let id = |key: &str, token: &str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| ModelError::Config {
                    path: config.clone(),
                    reason: format!("`{key}` {token:?} is not in the vocabulary"),
                })
        };
        let dropped = SysRegex::new(DROPPED).map_err(|e| config_error(dir, e))?;
        Ok(Self {
            bos: id("bos_token", &settings.bos)?,
            eos: id("eos_token", &settings.eos)?,
            pad: id("pad_token", &settings.pad)?,
            tokenizer,
            dropped: Arc::new(dropped),
            max_length: settings.max_length,
            clean_up_spaces: settings.clean_up_spaces,
            dir: dir.to_path_buf(),
        })
    }

    /// Tokenize one prompt (an empty one is valid): start token, up to `model_max_length - 2`
    /// tokens, end token, pad tokens. What did not fit is returned and logged as a warning,
    /// as diffusers' `encode_prompt` does.
    pub fn encode(&self, prompt: &str) -> Result<ClipEncoding, ModelError> {
        let text = self.basic_clean(prompt);
        let encoding = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| config_error(&self.dir, format!("cannot tokenize {prompt:?}: {e}")))?;
        let tokens = encoding.get_ids();
        let (kept, cut) = tokens.split_at(tokens.len().min(self.max_length - 2));
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos);
        ids.extend_from_slice(kept);
        ids.push(self.eos);
        ids.resize(self.max_length, self.pad);
        let truncated = if cut.is_empty() {
            None
        } else {
            let text = self.decode(cut)?;
            tracing::warn!(
                "The following part of your input was truncated because CLIP can only handle \
                 sequences up to {} tokens: {text}",
                self.max_length
            );
            Some(Truncation {
                ids: cut.to_vec(),
                text,
            })
        };
        Ok(ClipEncoding { ids, truncated })
    }

    /// Token ids back to text as transformers' `decode` gives it: word ends become spaces, and
    /// (when the config asks, as it does by default) spaces before punctuation and
    /// contractions are removed.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        let text = self
            .tokenizer
            .decode(ids, false)
            .map_err(|e| config_error(&self.dir, format!("cannot decode {ids:?}: {e}")))?;
        let text = text.replace("</w>", " ").trim().to_string();
        if !self.clean_up_spaces {
            return Ok(text);
        }
        Ok(text
            .replace(" .", ".")
            .replace(" ?", "?")
            .replace(" !", "!")
            .replace(" ,", ",")
            .replace(" ' ", "'")
            .replace(" n't", "n't")
            .replace(" 'm", "'m")
            .replace(" 's", "'s")
            .replace(" 've", "'ve")
            .replace(" 're", "'re"))
    }

    /// Every encoding's length: `model_max_length`.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// `BasicTokenizer(do_lower_case=True, strip_accents=False, do_split_on_punc=False)`'s
    /// words joined by single spaces: what the slow tokenizer runs its regex over.
    fn basic_clean(&self, text: &str) -> String {
        let dropped: Vec<usize> = self.dropped.find_iter(text).map(|(s, _)| s).collect();
        let mut cleaned = String::with_capacity(text.len());
        for (at, c) in text.char_indices() {
            if dropped.binary_search(&at).is_ok() {
                continue;
            }
            if is_whitespace(c) {
                cleaned.push(' ');
            } else if is_cjk(c) {
                cleaned.extend([' ', c, ' ']);
            } else {
                cleaned.push(c);
            }
        }
        let mut normalized = NormalizedString::from(cleaned);
        normalized.nfc();
        // `str::to_lowercase`, like Python's `str.lower`, gives a word-final capital sigma
        // its final form (per-character lowercasing does not).
        normalized
            .get()
            .split_whitespace()
            .map(str::to_lowercase)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// `_is_whitespace`: space, tab, LF, CR and the space separators (category Zs).
fn is_whitespace(c: char) -> bool {
    matches!(
        c,
        ' ' | '\t' | '\n' | '\r' | '\u{a0}' | '\u{1680}' | '\u{2000}'
            ..='\u{200a}' | '\u{202f}' | '\u{205f}' | '\u{3000}'
    )
}

/// `_is_chinese_char`: the CJK Unified Ideographs blocks.
fn is_cjk(c: char) -> bool {
    matches!(
        u32::from(c),
        0x4E00..=0x9FFF
            | 0x3400..=0x4DBF
            | 0x20000..=0x2A6DF
            | 0x2A700..=0x2B73F
            | 0x2B740..=0x2B81F
            | 0x2B820..=0x2CEAF
            | 0xF900..=0xFAFF
            | 0x2F800..=0x2FA1F
    )
}

fn config_error(path: &Path, reason: impl ToString) -> ModelError {
    ModelError::Config {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn read(path: &Path) -> Result<String, ModelError> {
    std::fs::read_to_string(path).map_err(|e| ModelError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The BPE `CLIPTokenizer` builds from `vocab.json` and `merges.txt`, as a `tokenizers`
/// pipeline (transformers' `CLIPConverter`, without its normalizer: the text arrives cleaned).
fn bpe_tokenizer(dir: &Path, unk: &str) -> Result<Tokenizer, ModelError> {
    let vocab_path = dir.join("vocab.json");
    let vocab: Vocab =
        serde_json::from_str::<std::collections::HashMap<String, u32>>(&read(&vocab_path)?)
            .map_err(|e| config_error(&vocab_path, format!("not a token -> id JSON object: {e}")))?
            .into_iter()
            .collect();
    let merges_path = dir.join("merges.txt");
    let merges = parse_merges(&read(&merges_path)?).map_err(|r| config_error(&merges_path, r))?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk.to_string())
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".to_string())
        .fuse_unk(false)
        .build()
        .map_err(|e| config_error(&merges_path, format!("does not fit vocab.json: {e}")))?;
    let split = Split::new(
        SplitPattern::Regex(WORDS.to_string()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| config_error(dir, e))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_pre_tokenizer(Some(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, false, false).into(),
        ])))
        .with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// merges.txt as `CLIPTokenizer` reads it: the first line (`#version: ...`) skipped, at most
/// [`MAX_MERGES`] pairs, one per line, rank = line order.
fn parse_merges(text: &str) -> Result<Vec<(String, String)>, String> {
    text.trim()
        .split('\n')
        .enumerate()
        .skip(1)
        .take(MAX_MERGES)
        .map(|(line, pair)| {
            let mut symbols = pair.split_whitespace();
            match (symbols.next(), symbols.next(), symbols.next()) {
                (Some(a), Some(b), None) => Ok((a.to_string(), b.to_string())),
                _ => Err(format!(
                    "line {}: expected two symbols separated by a space, found {pair:?}",
                    line + 1
                )),
            }
        })
        .collect()
}

/// The settings of `tokenizer_config.json` and `special_tokens_map.json` (both optional).
struct Settings {
    bos: String,
    eos: String,
    unk: String,
    pad: String,
    max_length: usize,
    clean_up_spaces: bool,
    /// Every added and special token, in the order transformers adds them.
    added: Vec<AddedToken>,
    /// `added_tokens_decoder`: the ids the config promises for its added tokens.
    added_ids: Vec<(u32, AddedToken)>,
}

impl Settings {
    fn load(dir: &Path) -> Result<Self, ModelError> {
        let config_path = dir.join("tokenizer_config.json");
        let map_path = dir.join("special_tokens_map.json");
        let config = read_object(&config_path)?;
        let map = read_object(&map_path)?;
        // Configs saved before transformers 4.34 have no `added_tokens_decoder`; for those,
        // `from_pretrained` lets special_tokens_map.json override the config's tokens.
        let legacy = !config.contains_key("added_tokens_decoder");
        let token = |key: &str, default: &str| -> Result<AddedToken, ModelError> {
            let (value, path) = match map.get(key) {
                Some(v) if legacy => (v, &map_path),
                _ => match config.get(key) {
                    Some(v) => (v, &config_path),
                    None => return Ok(AddedToken::from(default, true)),
                },
            };
            added_token(value, true).ok_or_else(|| {
                config_error(
                    path,
                    format!(
                        "`{key}` = {value}: expected a token (a string, or an object with a \
                         `content` string)"
                    ),
                )
            })
        };
        let bos = token("bos_token", "<|startoftext|>")?;
        let eos = token("eos_token", "<|endoftext|>")?;
        let unk = token("unk_token", "<|endoftext|>")?;
        let pad = token("pad_token", "<|endoftext|>")?;

        let max_length = match config.get("model_max_length") {
            None => 77,
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| (2..=1 << 20).contains(&n))
                .ok_or_else(|| {
                    config_error(
                        &config_path,
                        format!("`model_max_length` = {v}: expected an integer from 2 to 2^20"),
                    )
                })?,
        };
        let clean_up_spaces = match config.get("clean_up_tokenization_spaces") {
            None => true,
            Some(v) => v.as_bool().ok_or_else(|| {
                config_error(
                    &config_path,
                    format!("`clean_up_tokenization_spaces` = {v}: expected true or false"),
                )
            })?,
        };

        let mut added_ids = Vec::new();
        if let Some(decoder) = config.get("added_tokens_decoder") {
            let bad = |what: String| {
                config_error(&config_path, format!("`added_tokens_decoder`: {what}"))
            };
            let entries = decoder
                .as_object()
                .ok_or_else(|| bad(format!("expected an object, found {decoder}")))?;
            for (id, value) in entries {
                let id: u32 = id
                    .parse()
                    .map_err(|_| bad(format!("{id:?} is not a token id")))?;
                let special = value.get("special").and_then(Value::as_bool) == Some(true);
                let token = added_token(value, special)
                    .ok_or_else(|| bad(format!("entry {id} = {value} has no `content` string")))?;
                added_ids.push((id, token));
            }
        }
        added_ids.sort_by_key(|(id, _)| *id);
        let mut added: Vec<AddedToken> = added_ids.iter().map(|(_, t)| t.clone()).collect();
        for special in [&bos, &eos, &unk, &pad] {
            if !added.iter().any(|t| t.content == special.content) {
                added.push(special.clone());
            }
        }
        Ok(Self {
            bos: bos.content,
            eos: eos.content,
            unk: unk.content,
            pad: pad.content,
            max_length,
            clean_up_spaces,
            added,
            added_ids,
        })
    }
}

/// A JSON object from an optional file (a missing file is an empty object).
fn read_object(path: &Path) -> Result<Map<String, Value>, ModelError> {
    if !path.exists() {
        return Ok(Map::new());
    }
    match serde_json::from_str(&read(path)?) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(config_error(
            path,
            format!("expected a JSON object, found {other}"),
        )),
        Err(e) => Err(config_error(path, e)),
    }
}

/// A token as transformers serializes it: a string, or an `AddedToken` object whose flags
/// default as in Python.
fn added_token(value: &Value, special: bool) -> Option<AddedToken> {
    if let Some(content) = value.as_str() {
        return Some(AddedToken::from(content, special));
    }
    let flag =
        |key: &str, default: bool| value.get(key).and_then(Value::as_bool).unwrap_or(default);
    let content = value.get("content")?.as_str()?;
    Some(
        AddedToken::from(content, special)
            .single_word(flag("single_word", false))
            .lstrip(flag("lstrip", false))
            .rstrip(flag("rstrip", false))
            .normalized(flag("normalized", !special)),
    )
}
