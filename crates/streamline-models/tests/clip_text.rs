//! AnimateDiff's text side against transformers (fixtures/scripts/clip_text.py): the tokenizer's
//! ids against the slow `CLIPTokenizer` diffusers uses, from both a vocab.json + merges.txt
//! folder and a tokenizer.json folder; the tiny `CLIPTextModel`'s `last_hidden_state`; the
//! full-size ViT-L/14 checkpoint layout (manifest); and the errors broken files give.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use common::{fixture_dir, load_io, rel_l2, temp_dir};
use serde::Deserialize;
use streamline_models::clip_text::{ClipTextConfig, ClipTextModel, ClipTokenizer};
use streamline_models::load::{Manifest, ModelError, WeightSource};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn dir(name: &str) -> PathBuf {
    fixture_dir("clip_text").join(name)
}

/// One prompt of prompts.json: ids from transformers' slow `CLIPTokenizer` (the reference),
/// from `CLIPTokenizerFast`, and what truncation removed as diffusers decodes it.
#[derive(Deserialize)]
struct Record {
    name: String,
    prompt: String,
    ids: Vec<u32>,
    fast_ids: Vec<u32>,
    removed: Option<String>,
    pad_bang_ids: Vec<u32>,
    pad_bang_removed: Option<String>,
}

#[derive(Deserialize)]
struct Prompts {
    prompts: Vec<Record>,
}

fn prompts() -> Result<Vec<Record>, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(fixture_dir("clip_text").join("prompts.json"))?;
    Ok(serde_json::from_str::<Prompts>(&text)?.prompts)
}

fn record<'a>(records: &'a [Record], name: &str) -> &'a Record {
    records
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("prompts.json has no prompt {name:?}"))
}

/// Every fixture prompt through `tokenizer`, checked against `expected` (ids, removed text).
fn check_all(
    tokenizer: &ClipTokenizer,
    expected: impl Fn(&Record) -> (&[u32], Option<&str>),
) -> TestResult {
    let records = prompts()?;
    assert!(records.len() >= 15, "only {} prompts", records.len());
    let mut wrong = Vec::new();
    for r in &records {
        let (ids, removed) = expected(r);
        let got = tokenizer.encode(&r.prompt)?;
        let got_removed = got.truncated.as_ref().map(|t| t.text.as_str());
        if got.ids != ids || got_removed != removed {
            wrong.push(format!(
                "{}: {:?}\n  got      {:?} (removed {got_removed:?})\n  expected {ids:?} (removed {removed:?})",
                r.name, r.prompt, got.ids
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    Ok(())
}

#[test]
fn vocab_and_merges_give_the_slow_tokenizers_ids() -> TestResult {
    let tokenizer = ClipTokenizer::load(&dir("tokenizer"))?;
    assert!(!dir("tokenizer").join("tokenizer.json").exists());
    assert_eq!(tokenizer.max_length(), 77);
    check_all(&tokenizer, |r| (&r.ids, r.removed.as_deref()))
}

/// The fast tokenizer's own ids differ from the slow one's on some prompts (CJK runs, control
/// characters, final sigma); through this crate both folders give the slow ids diffusers uses.
#[test]
fn tokenizer_json_gives_the_slow_tokenizers_ids() -> TestResult {
    let differ: BTreeSet<String> = prompts()?
        .into_iter()
        .filter(|r| r.fast_ids != r.ids)
        .map(|r| r.name)
        .collect();
    let want: BTreeSet<String> = ["cjk_run", "control_chars", "final_sigma"]
        .map(String::from)
        .into();
    assert_eq!(differ, want, "prompts where transformers' fast != slow");
    let tokenizer = ClipTokenizer::load(&dir("tokenizer_fast"))?;
    check_all(&tokenizer, |r| (&r.ids, r.removed.as_deref()))
}

/// A copy of `name`'s folder without `drop`, unique to this test and process.
fn scratch(test: &str, name: &str, drop: &[&str]) -> std::io::Result<PathBuf> {
    let out = temp_dir(&format!("clip-text-{test}"));
    for entry in std::fs::read_dir(dir(name))? {
        let path = entry?.path();
        let file = path.file_name().unwrap_or_default();
        if !drop.iter().any(|d| file == *d) {
            std::fs::copy(&path, out.join(file))?;
        }
    }
    Ok(out)
}

#[test]
fn tokenizer_json_alone_is_enough() -> TestResult {
    let scratch = scratch(
        "json-alone",
        "tokenizer_fast",
        &["vocab.json", "merges.txt"],
    )?;
    let tokenizer = ClipTokenizer::load(&scratch)?;
    let records = prompts()?;
    for name in ["plain", "punctuation", "cjk_run", "long"] {
        let r = record(&records, name);
        assert_eq!(tokenizer.encode(&r.prompt)?.ids, r.ids, "{name}");
    }
    std::fs::remove_dir_all(scratch)?;
    Ok(())
}

/// SD 2.x pads with "!" (id 0), a special token that then also splits prompts; this folder also
/// has model_max_length 16, so most prompts are truncated.
#[test]
fn pad_token_and_length_come_from_the_config() -> TestResult {
    let tokenizer = ClipTokenizer::load(&dir("tokenizer_pad_bang"))?;
    assert_eq!((tokenizer.max_length(), tokenizer.pad_id()), (16, 0));
    check_all(&tokenizer, |r| {
        (&r.pad_bang_ids, r.pad_bang_removed.as_deref())
    })
}

/// tokenizer_config.json as SD 1.5 ships it (saved before transformers 4.34: no
/// `added_tokens_decoder`, tokens as `AddedToken` objects), here with model_max_length 16.
const LEGACY_CONFIG: &str = r#"{
  "add_prefix_space": false,
  "bos_token": {"__type": "AddedToken", "content": "<|startoftext|>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false},
  "do_lower_case": true,
  "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false},
  "errors": "replace",
  "model_max_length": 16,
  "name_or_path": "openai/clip-vit-large-patch14",
  "pad_token": "<|endoftext|>",
  "special_tokens_map_file": "./special_tokens_map.json",
  "tokenizer_class": "CLIPTokenizer",
  "unk_token": {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false}
}"#;

/// special_tokens_map.json in SD 1.5's format, with pad_token "!" instead of `<|endoftext|>`.
const LEGACY_MAP: &str = r#"{"bos_token": {"content": "<|startoftext|>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false}, "eos_token": {"content": "<|endoftext|>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false}, "pad_token": "!", "unk_token": {"content": "<|endoftext|>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false}}"#;

/// For such legacy configs transformers lets special_tokens_map.json override the config, so
/// these files pad with "!" to 16 tokens: the ids of tokenizer_pad_bang/ (checked with
/// transformers 4.44.2 when this test was written).
#[test]
fn legacy_sd15_configs_resolve_like_transformers() -> TestResult {
    let scratch = scratch(
        "legacy",
        "tokenizer",
        &["tokenizer_config.json", "special_tokens_map.json"],
    )?;
    std::fs::write(scratch.join("tokenizer_config.json"), LEGACY_CONFIG)?;
    std::fs::write(scratch.join("special_tokens_map.json"), LEGACY_MAP)?;
    let tokenizer = ClipTokenizer::load(&scratch)?;
    assert_eq!((tokenizer.max_length(), tokenizer.pad_id()), (16, 0));
    check_all(&tokenizer, |r| {
        (&r.pad_bang_ids, r.pad_bang_removed.as_deref())
    })?;
    std::fs::remove_dir_all(scratch)?;
    Ok(())
}

#[test]
fn long_prompt_is_truncated_and_reported() -> TestResult {
    let tokenizer = ClipTokenizer::load(&dir("tokenizer"))?;
    let records = prompts()?;
    let long = record(&records, "long");
    let got = tokenizer.encode(&long.prompt)?;
    assert_eq!(got.ids.len(), 77);
    // The end token is kept: no padding, the last id is the end token.
    assert_eq!(got.ids[76], tokenizer.eos_id());
    assert!(!got.ids[1..76].contains(&tokenizer.eos_id()));
    let cut = got
        .truncated
        .ok_or("long prompt not reported as truncated")?;
    assert_eq!(Some(cut.text.as_str()), long.removed.as_deref());
    // Kept and cut tokens together are the whole prompt (lower-case words, single spaces).
    let all: Vec<u32> = got.ids[1..76].iter().chain(&cut.ids).copied().collect();
    assert_eq!(tokenizer.decode(&all)?, long.prompt);
    Ok(())
}

#[test]
fn empty_prompt_is_start_end_and_padding() -> TestResult {
    let tokenizer = ClipTokenizer::load(&dir("tokenizer"))?;
    let got = tokenizer.encode("")?;
    assert_eq!(got.ids.len(), 77);
    assert_eq!(&got.ids[..2], &[tokenizer.bos_id(), tokenizer.eos_id()]);
    assert!(got.ids[2..].iter().all(|&id| id == tokenizer.pad_id()));
    assert_eq!(got.truncated, None);
    assert_ne!(tokenizer.bos_id(), tokenizer.eos_id());
    Ok(())
}

fn load_error(dir: &Path) -> Result<ModelError, String> {
    match ClipTokenizer::load(dir) {
        Ok(_) => Err(format!("{} loaded", dir.display())),
        Err(e) => Ok(e),
    }
}

#[test]
fn missing_merges_names_the_file() -> TestResult {
    let scratch = scratch("no-merges", "tokenizer", &["merges.txt"])?;
    let err = load_error(&scratch)?;
    let msg = err.to_string();
    assert!(matches!(err, ModelError::Io { .. }), "{msg}");
    assert!(
        msg.contains(&scratch.join("merges.txt").display().to_string()),
        "{msg}"
    );
    std::fs::remove_dir_all(scratch)?;
    Ok(())
}

#[test]
fn invalid_vocab_or_merges_name_the_file() -> TestResult {
    let scratch = scratch("bad-files", "tokenizer", &[])?;
    let (vocab, merges) = (scratch.join("vocab.json"), scratch.join("merges.txt"));
    let good_vocab = std::fs::read_to_string(&vocab)?;

    std::fs::write(&vocab, "[1, 2, 3]")?;
    let msg = load_error(&scratch)?.to_string();
    assert!(msg.contains(&vocab.display().to_string()), "{msg}");

    // A merge whose halves are not in the vocabulary.
    std::fs::write(&vocab, &good_vocab)?;
    let good_merges = std::fs::read_to_string(&merges)?;
    std::fs::write(&merges, format!("{good_merges}qq\u{2603} zz\u{2603}\n"))?;
    let msg = load_error(&scratch)?.to_string();
    assert!(msg.contains(&merges.display().to_string()), "{msg}");

    // A line that is not a pair.
    std::fs::write(&merges, good_merges.replacen("\n", "\na b c\n", 1))?;
    let msg = load_error(&scratch)?.to_string();
    assert!(
        msg.contains(&merges.display().to_string()) && msg.contains("line 2"),
        "{msg}"
    );
    std::fs::remove_dir_all(scratch)?;
    Ok(())
}

#[test]
fn null_pad_token_names_the_config() -> TestResult {
    let scratch = scratch("null-pad", "tokenizer", &[])?;
    let config = scratch.join("tokenizer_config.json");
    let text = std::fs::read_to_string(&config)?
        .replace("\"pad_token\": \"<|endoftext|>\"", "\"pad_token\": null");
    assert!(text.contains("null"));
    std::fs::write(&config, text)?;
    let msg = load_error(&scratch)?.to_string();
    assert!(
        msg.contains(&config.display().to_string()) && msg.contains("pad_token"),
        "{msg}"
    );
    std::fs::remove_dir_all(scratch)?;
    Ok(())
}

/// `(input_ids, last_hidden_state, clip_skip_1)` as transformers computed them in f32.
fn io() -> (Tensor, Tensor, Tensor) {
    let mut t = load_io("clip_text");
    let mut take = |name: &str| {
        t.remove(name)
            .unwrap_or_else(|| panic!("io.safetensors has no {name}"))
    };
    (
        take("input_ids"),
        take("last_hidden_state"),
        take("clip_skip_1"),
    )
}

/// `last_hidden_state` of the text_encoder folder `dir` in `dtype` vs transformers'.
fn hidden_error(dir: &Path, dtype: DType) -> Result<f64, Box<dyn std::error::Error>> {
    let (input_ids, expected, _) = io();
    let model = ClipTextModel::load(dir, dtype, &Device::Cpu)?;
    let got = model.forward(&input_ids)?;
    assert_eq!(got.dtype(), dtype);
    Ok(rel_l2(&got, &expected))
}

#[test]
fn last_hidden_state_matches_transformers_in_f32() -> TestResult {
    let err = hidden_error(&dir("text_encoder"), DType::F32)?;
    eprintln!("last_hidden_state relative L2 vs transformers (f32): {err:e}");
    assert!(err <= 1e-4, "relative L2 {err:e} > 1e-4");
    Ok(())
}

#[test]
fn clip_skip_matches_diffusers() -> TestResult {
    let (input_ids, last, expected) = io();
    let model = ClipTextModel::load(&dir("text_encoder"), DType::F32, &Device::Cpu)?;
    let got = model.forward_with_clip_skip(&input_ids, 1)?;
    let err = rel_l2(&got, &expected);
    assert!(err <= 1e-4, "clip_skip 1: relative L2 {err:e} > 1e-4");
    // Not the same as the last layer's output, or this test would prove nothing.
    assert!(rel_l2(&last, &expected) > 1e-2);
    assert!(model.forward_with_clip_skip(&input_ids, 3).is_err());
    Ok(())
}

/// The tokenizer's ids, as a u32 tensor, drive the model to the same output as transformers'
/// int64 ids.
#[test]
fn tokenizer_ids_feed_the_model() -> TestResult {
    let (input_ids, expected, _) = io();
    let tokenizer = ClipTokenizer::load(&dir("tokenizer"))?;
    let records = prompts()?;
    let mut ids = Vec::new();
    for name in ["plain", "punctuation", "long"] {
        ids.push(tokenizer.encode(&record(&records, name).prompt)?.ids);
    }
    let ids = Tensor::new(ids, &Device::Cpu)?;
    assert_eq!(
        ids.to_dtype(DType::I64)?.to_vec2::<i64>()?,
        input_ids.to_vec2::<i64>()?
    );
    let model = ClipTextModel::load(&dir("text_encoder"), DType::F32, &Device::Cpu)?;
    let err = rel_l2(&model.forward(&ids)?, &expected);
    assert!(err <= 1e-4, "relative L2 {err:e} > 1e-4");
    Ok(())
}

/// f16 compute, with the mask and softmax in f32. (bf16 takes the same path, but candle's CPU
/// matmul has no bf16 kernel.)
#[test]
fn f16_compute_and_fp16_weights() -> TestResult {
    let err = hidden_error(&dir("text_encoder"), DType::F16)?;
    eprintln!("last_hidden_state relative L2 vs transformers (f16 compute): {err:e}");
    assert!(err <= 5e-3, "f16: relative L2 {err:e} > 5e-3");
    assert!(dir("text_encoder_fp16")
        .join("model.fp16.safetensors")
        .is_file());
    let err = hidden_error(&dir("text_encoder_fp16"), DType::F32)?;
    eprintln!("last_hidden_state relative L2, fp16 weights in f32: {err:e}");
    assert!(err <= 1e-2, "fp16 weights: relative L2 {err:e} > 1e-2");
    Ok(())
}

#[test]
fn too_many_tokens_is_an_error() -> TestResult {
    let model = ClipTextModel::load(&dir("text_encoder"), DType::F32, &Device::Cpu)?;
    let ids = Tensor::zeros((1, 78), DType::U32, &Device::Cpu)?;
    let err = model.forward(&ids).err().ok_or("ran 78 tokens")?;
    assert!(err.to_string().contains("78"), "{err}");
    Ok(())
}

#[test]
fn fixture_checkpoint_is_used_exactly() -> TestResult {
    let encoder = dir("text_encoder");
    let config = ClipTextConfig::load(&encoder.join("config.json"))?;
    let source = WeightSource::open(&encoder.join("model.safetensors"))?;
    let held = source.tensors()?;
    let usage = source.usage();
    ClipTextModel::new(&config, source.var_builder(DType::F32, &Device::Cpu))?;
    assert_eq!(usage.requested(), held);
    Ok(())
}

#[derive(Deserialize)]
struct ManifestFile {
    config: ClipTextConfig,
    tensors: Manifest,
}

/// The full-size SD 1.5 text encoder, from names and shapes written on torch's meta device.
#[test]
fn full_size_checkpoint_layout_matches_manifest() -> TestResult {
    let path = fixture_dir("clip_text").join("manifest_vit_l14.json");
    let ManifestFile { config, tensors } = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    assert_eq!(config, ClipTextConfig::vit_l14());
    let source = WeightSource::manifest(&path, tensors.clone());
    let usage = source.usage();
    ClipTextModel::new(&config, source.var_builder(DType::F16, &Device::Cpu))?;
    assert_eq!(usage.requested(), tensors);
    Ok(())
}

/// A scratch copy of the fixture's text_encoder folder.
fn encoder_scratch(test: &str) -> std::io::Result<PathBuf> {
    scratch(test, "text_encoder", &[])
}

fn encoder_error(dir: &Path) -> Result<ModelError, String> {
    match ClipTextModel::load(dir, DType::F32, &Device::Cpu) {
        Ok(_) => Err(format!("{} loaded", dir.display())),
        Err(e) => Ok(e),
    }
}

#[test]
fn unsupported_activation_names_file_and_field() -> TestResult {
    let scratch = encoder_scratch("act")?;
    let config = scratch.join("config.json");
    let text = std::fs::read_to_string(&config)?.replace("\"quick_gelu\"", "\"relu\"");
    std::fs::write(&config, text)?;
    let err = encoder_error(&scratch)?;
    let msg = err.to_string();
    assert!(
        matches!(&err, ModelError::Unsupported { field, .. } if field == "hidden_act"),
        "{msg}"
    );
    assert!(
        msg.contains(&config.display().to_string()) && msg.contains("relu"),
        "{msg}"
    );
    std::fs::remove_dir_all(scratch)?;
    Ok(())
}

#[test]
fn missing_or_truncated_weights_name_file_and_tensor() -> TestResult {
    let scratch = encoder_scratch("weights")?;
    let weights = scratch.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu)?;
    let name = "text_model.encoder.layers.1.self_attn.k_proj.bias";
    tensors.remove(name).ok_or("fixture lacks the tensor")?;
    candle_core::safetensors::save(&tensors, &weights)?;
    let err = encoder_error(&scratch)?;
    let msg = err.to_string();
    assert!(matches!(err, ModelError::Weights { .. }), "{msg}");
    assert!(
        msg.contains(&weights.display().to_string()) && msg.contains(name),
        "{msg}"
    );

    let bytes = std::fs::read(dir("text_encoder").join("model.safetensors"))?;
    std::fs::write(&weights, &bytes[..bytes.len() / 2])?;
    let msg = encoder_error(&scratch)?.to_string();
    assert!(msg.contains(&weights.display().to_string()), "{msg}");
    std::fs::remove_dir_all(scratch)?;
    Ok(())
}

/// SD 1.5's text_encoder/model.safetensors predates non-persistent `position_ids` and still
/// holds it (int64); it loads and changes nothing.
#[test]
fn old_checkpoint_with_position_ids_loads() -> TestResult {
    let scratch = encoder_scratch("position-ids")?;
    let weights = scratch.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu)?;
    let ids = Tensor::arange(0i64, 77, &Device::Cpu)?.unsqueeze(0)?;
    tensors.insert("text_model.embeddings.position_ids".to_string(), ids);
    candle_core::safetensors::save(&tensors, &weights)?;
    let err = hidden_error(&scratch, DType::F32)?;
    assert!(err <= 1e-4, "relative L2 {err:e} > 1e-4");
    std::fs::remove_dir_all(scratch)?;
    Ok(())
}
