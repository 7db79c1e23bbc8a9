//! The load-time check that a checkpoint's floats are finite, and fit the dtype they are
//! loaded in: one pass over the mapped bytes, reading only exponent bits, so a corrupt or
//! diverged checkpoint is refused by name instead of decoding to a black video.

use candle_core::DType;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// f16's largest finite value: a wider float above it becomes infinite when loaded as f16.
const F16_MAX: f32 = 65504.0;

/// Why tensor `name` cannot be used, or `None`: a NaN or infinite element, or (loaded as
/// `target` f16) an element beyond f16's range.
pub(super) fn problem(name: &str, view: &TensorView<'_>, target: DType) -> Option<String> {
    let data = view.data();
    let narrows_to_f16 = target == DType::F16;
    let found = match view.dtype() {
        Dtype::F16 => first(data, |b: [u8; 2]| u16::from_le_bytes(b) & 0x7c00 == 0x7c00),
        Dtype::BF16 => first(data, |b: [u8; 2]| {
            let bits = u16::from_le_bytes(b);
            bits & 0x7f80 == 0x7f80 || narrows_to_f16 && too_big(u32::from(bits) << 16)
        }),
        Dtype::F32 => first(data, |b: [u8; 4]| {
            let bits = u32::from_le_bytes(b);
            bits & 0x7f80_0000 == 0x7f80_0000 || narrows_to_f16 && too_big(bits)
        }),
        Dtype::F64 => first(data, |b: [u8; 8]| {
            let value = f64::from_le_bytes(b);
            !value.is_finite() || narrows_to_f16 && value.abs() > f64::from(F16_MAX)
        }),
        // Integers are always finite; 8-bit floats are not a diffusers checkpoint format.
        _ => None,
    }?;
    Some(if narrows_to_f16 && view.dtype() != Dtype::F16 {
        format!(
            "tensor `{name}` holds a NaN, infinite or out-of-range value at element {found} (f16, \
             the dtype it is loaded in, ends at {F16_MAX})"
        )
    } else {
        format!("tensor `{name}` holds a NaN or infinite value at element {found}")
    })
}

fn too_big(f32_bits: u32) -> bool {
    f32::from_bits(f32_bits).abs() > F16_MAX
}

/// The index of the first `N`-byte element for which `bad` holds.
fn first<const N: usize>(data: &[u8], bad: impl Fn([u8; N]) -> bool) -> Option<usize> {
    data.chunks_exact(N).position(|chunk| {
        let mut bytes = [0u8; N];
        bytes.copy_from_slice(chunk);
        bad(bytes)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(dtype: Dtype, data: &[u8]) -> TensorView<'_> {
        let n = data.len() * 8 / dtype.bitsize();
        TensorView::new(dtype, vec![n], data).unwrap()
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn finds_the_first_non_finite_element_in_every_float_dtype() {
        let f32s = f32_bytes(&[1.0, -2.5, f32::NAN, f32::INFINITY]);
        let message = problem("w", &view(Dtype::F32, &f32s), DType::F32).unwrap();
        assert_eq!(
            message,
            "tensor `w` holds a NaN or infinite value at element 2"
        );
        assert!(problem("w", &view(Dtype::F32, &f32s[..8]), DType::F32).is_none());
        // f16 1.0, -inf; bf16 1.0, NaN.
        let f16s = [0x00, 0x3c, 0x00, 0xfc];
        assert!(problem("w", &view(Dtype::F16, &f16s), DType::F32)
            .unwrap()
            .contains("element 1"));
        let bf16s = [0x80, 0x3f, 0xc0, 0x7f];
        assert!(problem("w", &view(Dtype::BF16, &bf16s), DType::F32)
            .unwrap()
            .contains("element 1"));
        let f64s: Vec<u8> = [0.5f64, f64::NEG_INFINITY]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert!(problem("w", &view(Dtype::F64, &f64s), DType::F32).is_some());
    }

    #[test]
    fn values_past_f16_refuse_an_f16_load_only() {
        let big = f32_bytes(&[1.0, 70000.0]);
        assert!(problem("w", &view(Dtype::F32, &big), DType::F32).is_none());
        assert!(problem("w", &view(Dtype::F32, &big), DType::BF16).is_none());
        let message = problem("w", &view(Dtype::F32, &big), DType::F16).unwrap();
        assert!(
            message.contains("element 1") && message.contains("65504"),
            "{message}"
        );
    }
}
