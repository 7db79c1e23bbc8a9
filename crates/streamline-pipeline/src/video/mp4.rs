//! The MP4 container around [`super::h264`]: one H.264 video track, written with the `mp4`
//! crate and then laid out for streaming ("fast start": `moov` before `mdat`, as ffmpeg's
//! `-movflags +faststart` does, so a browser can start playing before the whole file arrived),
//! and read back into RGB frames.

use std::fs::File;
use std::io::{BufReader, Cursor};
use std::path::Path;

use bytes::Bytes;
use image::RgbImage;
use mp4::{
    AvcConfig, MediaConfig, MediaType, Mp4Config, Mp4Reader, Mp4Sample, Mp4Writer, TrackConfig,
    TrackType,
};

use super::h264::{self, Encoded};

/// Ticks of the media clock per frame: the timescale is `fps * TICKS`, so any frame rate with
/// three decimals (29.97 included) is exact.
const TICKS_PER_FRAME: u32 = 1000;

/// The frame rates an MP4 output takes: its clock counts thousandths of a frame per second.
pub fn fps_fits(fps: f64) -> bool {
    fps.is_finite() && (0.001..=1_000_000.0).contains(&fps)
}

/// Encodes `frames` as an H.264 MP4 at `fps` (which [`fps_fits`]), in memory.
pub fn encode_mp4(
    frames: impl IntoIterator<Item = Result<RgbImage, String>>,
    fps: f64,
) -> Result<Vec<u8>, String> {
    let encoded = h264::encode(frames)?;
    let timescale = (fps * f64::from(TICKS_PER_FRAME)).round() as u32;
    mux(&encoded, timescale)
        .map_err(|e| format!("cannot write the MP4 container: {e}"))
        .and_then(|bytes| fast_start(bytes).map_err(|e| format!("cannot lay out the MP4: {e}")))
}

fn mux(video: &Encoded, timescale: u32) -> mp4::Result<Vec<u8>> {
    let brands = ["isom", "iso2", "avc1", "mp41"];
    let config = Mp4Config {
        major_brand: "isom".parse()?,
        minor_version: 512,
        compatible_brands: brands.iter().map(|b| b.parse()).collect::<Result<_, _>>()?,
        timescale: 1000,
    };
    let mut writer = Mp4Writer::write_start(Cursor::new(Vec::new()), &config)?;
    let side = |n: usize| u16::try_from(n).map_err(|_| mp4::Error::InvalidData("frame side"));
    writer.add_track(&TrackConfig {
        track_type: TrackType::Video,
        timescale,
        language: "und".into(),
        media_conf: MediaConfig::AvcConfig(AvcConfig {
            width: side(video.width)?,
            height: side(video.height)?,
            seq_param_set: video.sps.clone(),
            pic_param_set: video.pps.clone(),
        }),
    })?;
    for (index, unit) in video.frames.iter().enumerate() {
        let mut bytes = Vec::new();
        for nal in &unit.nals {
            bytes.extend_from_slice(&(nal.len() as u32).to_be_bytes());
            bytes.extend_from_slice(nal);
        }
        let sample = Mp4Sample {
            start_time: index as u64 * u64::from(TICKS_PER_FRAME),
            duration: TICKS_PER_FRAME,
            rendering_offset: 0,
            is_sync: unit.is_sync,
            bytes: Bytes::from(bytes),
        };
        writer.write_sample(1, &sample)?;
    }
    writer.write_end()?;
    Ok(writer.into_writer().into_inner())
}

/// A box's header: where it starts, its whole size and the header's size.
struct BoxAt {
    kind: [u8; 4],
    start: usize,
    size: usize,
    header: usize,
}

/// The boxes that follow each other in `bytes[from..to]`.
fn boxes(bytes: &[u8], from: usize, to: usize) -> Result<Vec<BoxAt>, String> {
    let mut out = Vec::new();
    let mut at = from;
    while at + 8 <= to {
        let word = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
        let kind: [u8; 4] = bytes[at + 4..at + 8].try_into().unwrap();
        let (size, header) = match word(at) {
            1 if at + 16 <= to => {
                let large = u64::from_be_bytes(bytes[at + 8..at + 16].try_into().unwrap());
                (large as usize, 16)
            }
            0 => (to - at, 8),
            size => (size as usize, 8),
        };
        if size < header || at + size > to {
            return Err(format!("box {:?} overruns its parent", kind.escape_ascii()));
        }
        out.push(BoxAt {
            kind,
            start: at,
            size,
            header,
        });
        at += size;
    }
    Ok(out)
}

/// Moves `moov` ahead of `mdat`, shifting every chunk offset by `moov`'s size.
fn fast_start(mut bytes: Vec<u8>) -> Result<Vec<u8>, String> {
    let top = boxes(&bytes, 0, bytes.len())?;
    let find = |kind: &[u8; 4]| {
        top.iter()
            .find(|b| &b.kind == kind)
            .ok_or_else(|| format!("no {:?} box", kind.escape_ascii()))
    };
    let (ftyp, mdat, moov) = (find(b"ftyp")?, find(b"mdat")?, find(b"moov")?);
    if !(ftyp.start < mdat.start && mdat.start < moov.start) {
        return Err("unexpected box order".into());
    }
    shift_chunk_offsets(&mut bytes, moov, moov.size as u64)?;
    let mut out = Vec::with_capacity(bytes.len());
    for b in [ftyp, moov, mdat] {
        out.extend_from_slice(&bytes[b.start..b.start + b.size]);
    }
    Ok(out)
}

/// Adds `by` to each entry of the `stco` / `co64` boxes below `parent`.
fn shift_chunk_offsets(bytes: &mut [u8], parent: &BoxAt, by: u64) -> Result<(), String> {
    let children = boxes(
        bytes,
        parent.start + parent.header,
        parent.start + parent.size,
    )?;
    for child in children {
        match &child.kind {
            b"trak" | b"mdia" | b"minf" | b"stbl" => shift_chunk_offsets(bytes, &child, by)?,
            b"stco" | b"co64" => {
                let width = if &child.kind == b"co64" { 8 } else { 4 };
                // Version and flags, then the entry count.
                let entries = child.start + child.header + 8;
                for at in (entries..child.start + child.size).step_by(width) {
                    let field = &mut bytes[at..at + width];
                    let offset = field.iter().fold(0u64, |v, &b| v << 8 | u64::from(b)) + by;
                    if width == 4 && offset > u64::from(u32::MAX) {
                        return Err("a chunk offset outgrows stco".into());
                    }
                    field.copy_from_slice(&offset.to_be_bytes()[8 - width..]);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// An MP4's video, decoded: RGB frames (at the coded size, which is even) and the frame rate
/// its first sample's duration gives.
pub struct Mp4Video {
    pub frames: Vec<RgbImage>,
    pub fps: f64,
}

/// Reads the H.264 track of an MP4 file and decodes every frame.
pub fn read_mp4(path: &Path) -> Result<Mp4Video, String> {
    let file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    let mut reader = Mp4Reader::read_header(BufReader::new(file), size)
        .map_err(|e| format!("not an MP4: {e}"))?;
    let track = reader
        .tracks()
        .values()
        .find(|t| matches!(t.media_type(), Ok(MediaType::H264)))
        .ok_or("no H.264 video track")?;
    let (id, count, timescale) = (track.track_id(), track.sample_count(), track.timescale());
    let parameter_sets = [
        track
            .sequence_parameter_set()
            .map_err(|e| e.to_string())?
            .to_vec(),
        track
            .picture_parameter_set()
            .map_err(|e| e.to_string())?
            .to_vec(),
    ];
    let mut units = vec![parameter_sets.to_vec()];
    let mut fps = 0.0;
    for sample_id in 1..=count {
        let sample = reader
            .read_sample(id, sample_id)
            .map_err(|e| format!("sample {sample_id}: {e}"))?
            .ok_or_else(|| format!("sample {sample_id} is missing"))?;
        if sample_id == 1 && sample.duration > 0 {
            fps = f64::from(timescale) / f64::from(sample.duration);
        }
        units.push(length_prefixed_nals(&sample.bytes)?);
    }
    Ok(Mp4Video {
        frames: h264::decode(units)?,
        fps,
    })
}

/// The NAL units of an MP4 sample (each after its 4-byte length).
fn length_prefixed_nals(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut nals = Vec::new();
    while !bytes.is_empty() {
        let len = bytes
            .get(..4)
            .map(|b| u32::from_be_bytes(b.try_into().unwrap()) as usize)
            .filter(|&len| len <= bytes.len() - 4)
            .ok_or("a NAL unit overruns its sample")?;
        nals.push(bytes[4..4 + len].to_vec());
        bytes = &bytes[4 + len..];
    }
    Ok(nals)
}
