//! Frames and where they come from: pure YUYV/MJPG -> RGB conversions, replay of image files
//! and the synthetic microscope. Every source sits behind [`FrameSource`].

use std::path::PathBuf;
use std::time::SystemTime;

use image::RgbImage;
use rayon::prelude::*;
use reddino_models::synth::{self, CellTruth, FieldSpec, SourcePreset};

/// Why a frame could not be produced or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("frame buffer has {actual} bytes, expected {expected} for {width}x{height} YUYV")]
    WrongSize {
        width: u32,
        height: u32,
        expected: usize,
        actual: usize,
    },
    #[error("MJPG frame does not decode: {0}")]
    BadJpeg(String),
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("synthetic source: {0}")]
    Synthetic(String),
    /// The camera could not be opened, configured or read; the source reopens it.
    #[error("camera {device}: {msg}")]
    Camera { device: PathBuf, msg: String },
}

impl CaptureError {
    /// A failure of the device itself (as opposed to one bad frame): retry with backoff.
    pub fn is_device_error(&self) -> bool {
        matches!(self, CaptureError::Camera { .. })
    }
}

/// One frame with its capture time and, for synthetic frames, the ground truth.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Per-source frame counter.
    pub index: u64,
    pub captured: SystemTime,
    pub image: RgbImage,
    /// Where it came from (file path, device, synthetic source).
    pub origin: String,
    pub truth: Option<Vec<CellTruth>>,
}

/// A frame as its source holds it: decoded already (image files, the synthetic microscope), or
/// a camera's buffer still to be decoded. The pipeline's cells stage decodes a camera's frames
/// as it takes them, not as they arrive: a frame dropped because analysis is behind costs a
/// copy of its buffer, not a decode.
#[derive(Debug, Clone)]
pub enum Captured {
    Decoded(Frame),
    Buffer(CameraBuffer),
}

/// A camera frame's bytes, copied out of the driver's buffer, not decoded yet.
#[derive(Debug, Clone)]
pub struct CameraBuffer {
    pub index: u64,
    pub captured: SystemTime,
    pub origin: String,
    pub format: PixelFormat,
    /// The camera's size: a frame of another size is refused when decoded.
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl Captured {
    /// The frame, decoded (a bad buffer is an error naming what is wrong with it).
    pub fn decode(self) -> Result<Frame, CaptureError> {
        self.decode_into(Vec::new())
    }

    /// [`Captured::decode`] into `spare`, the pixels of a frame no longer needed: a camera's
    /// frames are decoded into the same memory frame after frame (a frame of the camera's size
    /// takes no allocation and no zeroing). Decoded frames are kept as they are.
    pub fn decode_into(self, spare: Vec<u8>) -> Result<Frame, CaptureError> {
        match self {
            Captured::Decoded(f) => Ok(f),
            Captured::Buffer(b) => Ok(Frame {
                image: match b.format {
                    PixelFormat::Yuyv => yuyv_to_rgb_into(&b.data, b.width, b.height, spare)?,
                    PixelFormat::Mjpg => {
                        mjpg_to_rgb_into(&b.data, Some((b.width, b.height)), spare)?
                    }
                },
                index: b.index,
                captured: b.captured,
                origin: b.origin,
                truth: None,
            }),
        }
    }

    /// The frame's per-source counter.
    pub fn index(&self) -> u64 {
        match self {
            Captured::Decoded(f) => f.index,
            Captured::Buffer(b) => b.index,
        }
    }
}

/// A source of frames. `Ok(None)` means the source is exhausted.
pub trait FrameSource: Send {
    /// The next frame, decoded.
    fn next_frame(&mut self) -> Result<Option<Frame>, CaptureError>;
    /// The next frame as the source holds it (what the pipeline's capture stage takes): a
    /// camera gives its buffer undecoded; other sources their decoded frames.
    fn next_captured(&mut self) -> Result<Option<Captured>, CaptureError> {
        Ok(self.next_frame()?.map(Captured::Decoded))
    }
    /// A live source produces frames whether or not they are taken (a camera): when processing
    /// falls behind, the oldest waiting frames are dropped. Offline sources wait instead.
    fn is_live(&self) -> bool {
        false
    }
}

impl<S: FrameSource + ?Sized> FrameSource for Box<S> {
    fn next_frame(&mut self) -> Result<Option<Frame>, CaptureError> {
        (**self).next_frame()
    }
    fn next_captured(&mut self) -> Result<Option<Captured>, CaptureError> {
        (**self).next_captured()
    }
    fn is_live(&self) -> bool {
        (**self).is_live()
    }
}

/// Delivers another source's frames no faster than `fps`, like a camera (and so is live).
pub struct Paced<S> {
    inner: S,
    period: std::time::Duration,
    next: Option<std::time::Instant>,
}

impl<S: FrameSource> Paced<S> {
    pub fn new(inner: S, fps: f64) -> Self {
        Paced {
            inner,
            period: std::time::Duration::from_secs_f64(1.0 / fps),
            next: None,
        }
    }
}

impl<S> Paced<S> {
    /// Sleeps until the next frame is due.
    fn wait_turn(&mut self) {
        let now = std::time::Instant::now();
        let due = self.next.unwrap_or(now);
        if due > now {
            std::thread::sleep(due - now);
        }
        // A source slower than the rate is not made to catch up in a burst.
        self.next = Some(due.max(now) + self.period);
    }
}

impl<S: FrameSource> FrameSource for Paced<S> {
    fn next_frame(&mut self) -> Result<Option<Frame>, CaptureError> {
        self.wait_turn();
        self.inner.next_frame()
    }

    fn next_captured(&mut self) -> Result<Option<Captured>, CaptureError> {
        self.wait_turn();
        self.inner.next_captured()
    }

    fn is_live(&self) -> bool {
        true
    }
}

/// Camera pixel format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum PixelFormat {
    #[serde(rename = "MJPG")]
    Mjpg,
    #[serde(rename = "YUYV")]
    Yuyv,
}

/// A V4L2 camera streaming through MMAP buffers. Frames are decoded from the `bytesused`
/// part of each buffer. When the device fails (unplugged, stops delivering) the stream is
/// dropped and the next call tries to open it again; the caller paces the retries.
pub struct V4l2Source {
    device: PathBuf,
    width: u32,
    height: u32,
    format: PixelFormat,
    stream: Option<V4l2Stream>,
    next: u64,
}

struct V4l2Stream {
    // Field order: the stream is dropped (buffers unmapped) before the device is closed.
    stream: v4l::io::mmap::Stream<'static>,
    _dev: v4l::Device,
    width: u32,
    height: u32,
}

impl V4l2Source {
    pub fn new(device: PathBuf, width: u32, height: u32, format: PixelFormat) -> Self {
        V4l2Source {
            device,
            width,
            height,
            format,
            stream: None,
            next: 0,
        }
    }

    fn err(&self, msg: impl std::fmt::Display) -> CaptureError {
        CaptureError::Camera {
            device: self.device.clone(),
            msg: msg.to_string(),
        }
    }

    fn open(&self) -> Result<V4l2Stream, CaptureError> {
        use v4l::video::Capture;
        let dev = v4l::Device::with_path(&self.device)
            .map_err(|e| self.err(format!("cannot open: {e}")))?;
        let fourcc = match self.format {
            PixelFormat::Mjpg => v4l::FourCC::new(b"MJPG"),
            PixelFormat::Yuyv => v4l::FourCC::new(b"YUYV"),
        };
        let got = dev
            .set_format(&v4l::Format::new(self.width, self.height, fourcc))
            .map_err(|e| self.err(format!("cannot set the format: {e}")))?;
        if got.fourcc != fourcc {
            return Err(self.err(format!(
                "does not offer {fourcc} at {}x{} (it offered {} at {}x{})",
                self.width, self.height, got.fourcc, got.width, got.height
            )));
        }
        if (got.width, got.height) != (self.width, self.height) {
            log::warn!(
                "camera {}: asked for {}x{}, streaming {}x{}",
                self.device.display(),
                self.width,
                self.height,
                got.width,
                got.height
            );
        }
        let mut stream =
            v4l::io::mmap::Stream::with_buffers(&dev, v4l::buffer::Type::VideoCapture, 4)
                .map_err(|e| self.err(format!("cannot start MMAP streaming: {e}")))?;
        stream.set_timeout(std::time::Duration::from_secs(5));
        log::info!(
            "camera {}: streaming {} {}x{}",
            self.device.display(),
            fourcc,
            got.width,
            got.height
        );
        Ok(V4l2Stream {
            stream,
            _dev: dev,
            width: got.width,
            height: got.height,
        })
    }
}

impl FrameSource for V4l2Source {
    fn next_frame(&mut self) -> Result<Option<Frame>, CaptureError> {
        self.next_captured()?.map(Captured::decode).transpose()
    }

    fn next_captured(&mut self) -> Result<Option<Captured>, CaptureError> {
        use v4l::io::traits::CaptureStream;
        if self.stream.is_none() {
            self.stream = Some(self.open()?);
        }
        let s = self.stream.as_mut().expect("opened above");
        let (w, h) = (s.width, s.height);
        let (data, used) = match s.stream.next() {
            Ok((buf, meta)) => (buf, meta.bytesused as usize),
            Err(e) => {
                self.stream = None;
                return Err(self.err(format!("stopped delivering frames: {e}")));
            }
        };
        // Copied out: the driver reuses its buffer for a later frame.
        let data = data[..used.min(data.len())].to_vec();
        let index = self.next;
        self.next += 1;
        Ok(Some(Captured::Buffer(CameraBuffer {
            index,
            captured: SystemTime::now(),
            origin: self.device.display().to_string(),
            format: self.format,
            width: w,
            height: h,
            data,
        })))
    }

    fn is_live(&self) -> bool {
        true
    }
}

#[inline]
fn clamp_u8(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}

/// Converts packed YUYV 4:2:2 (BT.601, limited range) to RGB. `data` is the driver buffer;
/// only `bytesused` bytes of it are meaningful and must equal `width * height * 2`.
pub fn yuyv_to_rgb(data: &[u8], width: u32, height: u32) -> Result<RgbImage, CaptureError> {
    yuyv_to_rgb_into(data, width, height, Vec::new())
}

/// [`yuyv_to_rgb`] into `buf` (taken over and resized: a buffer of the frame's size is
/// written as it is).
pub fn yuyv_to_rgb_into(
    data: &[u8],
    width: u32,
    height: u32,
    mut buf: Vec<u8>,
) -> Result<RgbImage, CaptureError> {
    let expected = width as usize * height as usize * 2;
    if width % 2 != 0 || data.len() != expected {
        return Err(CaptureError::WrongSize {
            width,
            height,
            expected,
            actual: data.len(),
        });
    }
    let (w, h) = (width as usize, height as usize);
    buf.resize(w * h * 3, 0);
    let mut out = buf;
    // Rows side by side on the rayon pool.
    let row = |(src, dst): (&[u8], &mut [u8])| {
        for (src, dst) in src.chunks_exact(4).zip(dst.chunks_exact_mut(6)) {
            let (y0, u, y1, v) = (
                src[0] as i32,
                src[1] as i32 - 128,
                src[2] as i32,
                src[3] as i32 - 128,
            );
            let (rv, guv, bu) = (409 * v + 128, -100 * u - 208 * v + 128, 516 * u + 128);
            let (c0, c1) = (298 * (y0 - 16), 298 * (y1 - 16));
            dst.copy_from_slice(&[
                clamp_u8((c0 + rv) >> 8),
                clamp_u8((c0 + guv) >> 8),
                clamp_u8((c0 + bu) >> 8),
                clamp_u8((c1 + rv) >> 8),
                clamp_u8((c1 + guv) >> 8),
                clamp_u8((c1 + bu) >> 8),
            ]);
        }
    };
    data.par_chunks_exact(2 * w)
        .zip(out.par_chunks_exact_mut(3 * w))
        .for_each(row);
    Ok(RgbImage::from_raw(width, height, out).expect("buffer sized for the image"))
}

/// Decodes an MJPG frame (one JPEG image) to RGB, checking its size when `expect` is given.
pub fn mjpg_to_rgb(data: &[u8], expect: Option<(u32, u32)>) -> Result<RgbImage, CaptureError> {
    mjpg_to_rgb_into(data, expect, Vec::new())
}

/// [`mjpg_to_rgb`] into `buf`, a frame's pixels no longer needed (taken over and resized: a
/// buffer of the frame's size is written as it is, no allocation, no zeroing).
pub fn mjpg_to_rgb_into(
    data: &[u8],
    expect: Option<(u32, u32)>,
    mut buf: Vec<u8>,
) -> Result<RgbImage, CaptureError> {
    // Some drivers pad the buffer with zeros after the end-of-image marker.
    let end = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let data = &data[..end];
    if !data.starts_with(&[0xFF, 0xD8]) {
        return Err(CaptureError::BadJpeg(
            "no start-of-image marker (not a JPEG frame)".into(),
        ));
    }
    if !data.ends_with(&[0xFF, 0xD9]) {
        return Err(CaptureError::BadJpeg(format!(
            "truncated: no end-of-image marker after {} bytes",
            data.len()
        )));
    }
    // Many cameras leave JPEG's standard Huffman tables out of their frames (the AVI1 format);
    // the decoder takes them when the frame says it is AVI1, which not every camera does.
    let avi1;
    let data = if huffman_tables_missing(data) {
        avi1 = [&data[..2], &AVI1_APP0[..], &data[2..]].concat();
        &avi1[..]
    } else {
        data
    };
    let bad = |e: zune_jpeg::errors::DecodeErrors| CaptureError::BadJpeg(e.to_string());
    // As the image crate reads a JPEG (not strict: a camera's small deviations pass), decoded
    // straight to RGB; the size limits are checked below, with a message naming both sizes.
    let options = zune_core::options::DecoderOptions::default()
        .set_strict_mode(false)
        .set_max_width(usize::MAX)
        .set_max_height(usize::MAX)
        .jpeg_set_out_colorspace(zune_core::colorspace::ColorSpace::RGB);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(
        zune_core::bytestream::ZCursor::new(data),
        options,
    );
    // The size from the header, checked before any pixel is written.
    decoder.decode_headers().map_err(bad)?;
    let (w0, h0) = decoder.dimensions().expect("headers decoded");
    let (w0, h0) = (w0 as u32, h0 as u32);
    if let Some((w, h)) = expect.filter(|&wh| wh != (w0, h0)) {
        return Err(CaptureError::BadJpeg(format!(
            "frame is {w0}x{h0}, the camera was set to {w}x{h}"
        )));
    }
    let n = 3 * w0 as u64 * h0 as u64;
    if w0.max(h0) > MAX_IMAGE_SIDE || n > MAX_IMAGE_BYTES {
        return Err(CaptureError::BadJpeg(format!(
            "{w0}x{h0} is over the largest frame decoded ({MAX_IMAGE_SIDE} pixels a side, \
             {MAX_IMAGE_BYTES} bytes)"
        )));
    }
    buf.resize(n as usize, 0);
    decoder.decode_into(&mut buf).map_err(bad)?;
    Ok(RgbImage::from_raw(w0, h0, buf).expect("buffer sized for the image"))
}

/// An APP0 segment saying "AVI1": the frame's Huffman tables, if left out, are JPEG's standard
/// ones (OpenDML AVI File Format Extensions, the MJPEG format cameras send).
const AVI1_APP0: [u8; 9] = [0xFF, 0xE0, 0x00, 0x07, b'A', b'V', b'I', b'1', 0];

/// Whether the JPEG `data` reaches its scan with no Huffman table and no AVI1 marker (false
/// when its segments cannot be followed: the decoder then says what is wrong).
fn huffman_tables_missing(data: &[u8]) -> bool {
    let mut at = 2;
    while at + 4 <= data.len() && data[at] == 0xFF {
        let marker = data[at + 1];
        let len = u16::from_be_bytes([data[at + 2], data[at + 3]]) as usize;
        match marker {
            0xDA => return true,
            0xC4 => return false,
            0xE0 if data[at + 4..].starts_with(b"AVI1") => return false,
            _ => at += 2 + len,
        }
    }
    false
}

/// Largest image side decoded from a file (a 2592x1944 camera field fits many times over);
/// larger images are refused before their pixels are allocated.
pub const MAX_IMAGE_SIDE: u32 = 8192;
/// Most memory one decoded image may take.
pub const MAX_IMAGE_BYTES: u64 = 512 << 20;

/// Decodes an image file (png, jpg, bmp, tif; the format told by the content) to RGB: a JPEG
/// cut short (no end-of-image marker) is refused rather than decoded with its missing part
/// filled in, and an image over [`MAX_IMAGE_SIDE`] or [`MAX_IMAGE_BYTES`] is refused from its
/// header, before its pixels are allocated.
pub fn decode_image_file(path: &std::path::Path) -> Result<RgbImage, CaptureError> {
    let data = std::fs::read(path).map_err(|e| CaptureError::File {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    decode_image_bytes(&data, path)
}

/// [`decode_image_file`] on a file's bytes; `path` names it in errors.
pub fn decode_image_bytes(data: &[u8], path: &std::path::Path) -> Result<RgbImage, CaptureError> {
    let fail = |msg: String| CaptureError::File {
        path: path.to_path_buf(),
        msg,
    };
    if data.starts_with(&[0xFF, 0xD8]) {
        let end = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        if !data[..end].ends_with(&[0xFF, 0xD9]) {
            return Err(fail(format!(
                "truncated JPEG: no end-of-image marker after {} bytes",
                data.len()
            )));
        }
    }
    let mut reader = image::ImageReader::new(std::io::Cursor::new(data))
        .with_guessed_format()
        .map_err(|e| fail(format!("cannot decode: {e}")))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_BYTES);
    reader.limits(limits);
    Ok(reader
        .decode()
        .map_err(|e| fail(format!("cannot decode: {e}")))?
        .to_rgb8())
}

/// Replays image files in order (png, jpg, bmp, tif), and raw camera frames recorded from
/// V4L2 buffers (`.mjpg`, `.yuyv`), which go through the camera's own decoding and checks.
pub struct ReplaySource {
    files: Vec<PathBuf>,
    next: usize,
    looped: bool,
    raw_size: (u32, u32),
}

impl ReplaySource {
    /// From explicit files, or every image under a directory (sorted), optionally looping.
    pub fn new(paths: &[PathBuf], looped: bool) -> Result<Self, CaptureError> {
        let mut files = Vec::new();
        for p in paths {
            if p.is_dir() {
                let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                    .map_err(|e| CaptureError::File {
                        path: p.clone(),
                        msg: e.to_string(),
                    })?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|f| {
                        matches!(
                            f.extension()
                                .and_then(|e| e.to_str())
                                .map(str::to_ascii_lowercase)
                                .as_deref(),
                            Some("png" | "jpg" | "jpeg" | "bmp" | "tif" | "tiff" | "mjpg" | "yuyv")
                        )
                    })
                    .collect();
                found.sort();
                files.extend(found);
            } else {
                files.push(p.clone());
            }
        }
        Ok(ReplaySource {
            files,
            next: 0,
            looped,
            raw_size: (0, 0),
        })
    }

    /// The frame size of raw `.yuyv`/`.mjpg` recordings (the camera's configured size).
    pub fn with_raw_size(mut self, width: u32, height: u32) -> Self {
        self.raw_size = (width, height);
        self
    }

    fn load(&self, path: &PathBuf) -> Result<RgbImage, CaptureError> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let (w, h) = self.raw_size;
        let raw = || {
            std::fs::read(path).map_err(|e| CaptureError::File {
                path: path.clone(),
                msg: e.to_string(),
            })
        };
        let tag = |e: CaptureError| CaptureError::File {
            path: path.clone(),
            msg: e.to_string(),
        };
        match ext.as_deref() {
            Some("yuyv") => yuyv_to_rgb(&raw()?, w, h).map_err(tag),
            Some("mjpg") => mjpg_to_rgb(&raw()?, Some((w, h))).map_err(tag),
            _ => decode_image_file(path),
        }
    }
}

impl FrameSource for ReplaySource {
    fn next_frame(&mut self) -> Result<Option<Frame>, CaptureError> {
        if self.files.is_empty() || (!self.looped && self.next >= self.files.len()) {
            return Ok(None);
        }
        let path = &self.files[self.next % self.files.len()].clone();
        let index = self.next as u64;
        self.next += 1;
        let image = self.load(path)?;
        Ok(Some(Frame {
            index,
            captured: SystemTime::now(),
            image,
            origin: path.display().to_string(),
            truth: None,
        }))
    }
}

/// The synthetic microscope: fields from the models crate's generator, with ground truth.
pub struct SyntheticSource {
    sources: Vec<SourcePreset>,
    width: u32,
    height: u32,
    seed: u64,
    next: u64,
    limit: Option<u64>,
}

impl SyntheticSource {
    /// Cycles through `sources`; stops after `limit` frames if given.
    pub fn new(
        sources: Vec<SourcePreset>,
        width: u32,
        height: u32,
        seed: u64,
        limit: Option<u64>,
    ) -> Self {
        SyntheticSource {
            sources,
            width,
            height,
            seed,
            next: 0,
            limit,
        }
    }
}

impl FrameSource for SyntheticSource {
    fn next_frame(&mut self) -> Result<Option<Frame>, CaptureError> {
        if self.sources.is_empty() || self.limit.is_some_and(|l| self.next >= l) {
            return Ok(None);
        }
        let src = self.sources[(self.next % self.sources.len() as u64) as usize].clone();
        let spec = FieldSpec::new(
            self.width,
            self.height,
            self.seed.wrapping_add(self.next),
            src,
        );
        let field = synth::render(&spec).map_err(|e| CaptureError::Synthetic(e.to_string()))?;
        let index = self.next;
        self.next += 1;
        Ok(Some(Frame {
            index,
            captured: SystemTime::now(),
            image: field.image,
            origin: format!("synthetic:{}", field.source),
            truth: Some(field.cells),
        }))
    }
}

/// Where frames come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    V4l2,
    Replay,
    Synthetic,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraConfig {
    pub source: SourceKind,
    /// v4l2: the device node.
    #[serde(default = "default_device")]
    pub device: PathBuf,
    #[serde(default = "default_width")]
    pub width: u32,
    #[serde(default = "default_height")]
    pub height: u32,
    #[serde(default = "default_format")]
    pub format: PixelFormat,
    /// replay: image files or directories.
    #[serde(default)]
    pub paths: Vec<PathBuf>,
    /// replay: start again at the end.
    #[serde(default, rename = "loop")]
    pub looped: bool,
    /// synthetic: acquisition-source presets cycled frame by frame.
    #[serde(default = "default_sources")]
    pub sources: Vec<String>,
    /// synthetic: seed of the first field.
    #[serde(default)]
    pub seed: u64,
    /// replay/synthetic: stop after this many frames.
    pub frames: Option<u64>,
    /// replay/synthetic: deliver frames at this rate like a camera (frames are then dropped
    /// when processing falls behind); 0 = as fast as they are processed, none dropped.
    #[serde(default)]
    pub fps: f64,
    /// v4l2: longest wait between attempts to reopen a failed camera.
    #[serde(default = "default_retry_max")]
    pub retry_max_s: f64,
    /// A live camera that delivers no frame (and no error) for this long is reported as
    /// stalled in `status.camera_error`.
    #[serde(default = "default_stall")]
    pub stall_s: f64,
}

fn default_stall() -> f64 {
    10.0
}

fn default_device() -> PathBuf {
    PathBuf::from("/dev/video0")
}
fn default_width() -> u32 {
    1920
}
fn default_height() -> u32 {
    1080
}
fn default_format() -> PixelFormat {
    PixelFormat::Mjpg
}
fn default_sources() -> Vec<String> {
    vec!["wright_100x".into()]
}
fn default_retry_max() -> f64 {
    10.0
}

/// Builds the frame source a camera config names.
pub fn build_source(c: &CameraConfig) -> Result<Box<dyn FrameSource>, CaptureError> {
    let limit = c.frames;
    let src: Box<dyn FrameSource> = match c.source {
        SourceKind::V4l2 => Box::new(V4l2Source::new(
            c.device.clone(),
            c.width,
            c.height,
            c.format,
        )),
        SourceKind::Replay => {
            let r = ReplaySource::new(&c.paths, c.looped)?.with_raw_size(c.width, c.height);
            match limit {
                Some(n) => Box::new(Limited { inner: r, left: n }),
                None => Box::new(r),
            }
        }
        SourceKind::Synthetic => {
            let presets = c
                .sources
                .iter()
                .map(|n| SourcePreset::by_name(n))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| CaptureError::Synthetic(e.to_string()))?;
            Box::new(SyntheticSource::new(
                presets, c.width, c.height, c.seed, limit,
            ))
        }
    };
    if c.fps > 0.0 && c.source != SourceKind::V4l2 {
        return Ok(Box::new(Paced::new(src, c.fps)));
    }
    Ok(src)
}

/// Stops another source after `left` frames.
struct Limited<S> {
    inner: S,
    left: u64,
}

impl<S: FrameSource> FrameSource for Limited<S> {
    fn next_frame(&mut self) -> Result<Option<Frame>, CaptureError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        self.inner.next_frame()
    }
    fn is_live(&self) -> bool {
        self.inner.is_live()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RGB -> YUYV (BT.601 limited range), the inverse the camera applies.
    fn rgb_to_yuyv(img: &RgbImage) -> Vec<u8> {
        let yuv = |p: &[u8]| {
            let (r, g, b) = (p[0] as f32, p[1] as f32, p[2] as f32);
            (
                16.0 + 0.257 * r + 0.504 * g + 0.098 * b,
                128.0 - 0.148 * r - 0.291 * g + 0.439 * b,
                128.0 + 0.439 * r - 0.368 * g - 0.071 * b,
            )
        };
        let mut out = Vec::new();
        for pair in img.as_raw().chunks_exact(6) {
            let (y0, u0, v0) = yuv(&pair[..3]);
            let (y1, u1, v1) = yuv(&pair[3..]);
            out.extend_from_slice(&[
                y0.round() as u8,
                ((u0 + u1) / 2.0).round() as u8,
                y1.round() as u8,
                ((v0 + v1) / 2.0).round() as u8,
            ]);
        }
        out
    }

    #[test]
    fn yuyv_known_values() {
        // Black, white, and pure red/blue chroma in limited range.
        let frame = [16, 128, 235, 128, 81, 90, 81, 240];
        let img = yuyv_to_rgb(&frame, 4, 1).unwrap();
        assert_eq!(img.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(img.get_pixel(1, 0).0, [255, 255, 255]);
        let red = img.get_pixel(2, 0).0;
        assert!(red[0] > 240 && red[1] < 15 && red[2] < 15, "{red:?}");
    }

    #[test]
    fn yuyv_round_trip_of_a_smear() {
        let field = synth::render(&FieldSpec::new(
            320,
            240,
            1,
            SourcePreset::by_name("wright_100x").unwrap(),
        ))
        .unwrap();
        let yuyv = rgb_to_yuyv(&field.image);
        let back = yuyv_to_rgb(&yuyv, 320, 240).unwrap();
        let err: f64 = field
            .image
            .as_raw()
            .iter()
            .zip(back.as_raw())
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .sum::<f64>()
            / back.as_raw().len() as f64;
        assert!(err < 4.0, "mean abs error {err}");
    }

    #[test]
    fn yuyv_wrong_size_is_refused() {
        let e = yuyv_to_rgb(&[0u8; 10], 4, 2).unwrap_err();
        assert!(e.to_string().contains("expected 16"), "{e}");
        assert!(yuyv_to_rgb(&[0u8; 6], 3, 1).is_err());
    }

    #[test]
    fn an_mjpg_frame_claiming_a_huge_size_is_refused_from_its_header() {
        let mut jpg = Vec::new();
        image::RgbImage::from_pixel(16, 12, image::Rgb([200, 80, 90]))
            .write_to(
                &mut std::io::Cursor::new(&mut jpg),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
        // The start-of-frame header: marker, length, precision, then height and width.
        let sof = jpg
            .windows(2)
            .position(|w| w == [0xFF, 0xC0])
            .expect("a baseline JPEG");
        jpg[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]); // 60000 x 60000
        let e = mjpg_to_rgb(&jpg, Some((640, 480))).unwrap_err().to_string();
        assert!(e.contains("60000x60000") && e.contains("640x480"), "{e}");
        // Without a camera size the file limits hold: refused, not 10 GB allocated.
        assert!(mjpg_to_rgb(&jpg, None).is_err());
    }

    #[test]
    fn mjpg_decodes_and_refuses_truncated_and_wrong_size() {
        let img = RgbImage::from_pixel(64, 48, image::Rgb([200, 100, 50]));
        let mut jpg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 90)
            .encode_image(&img)
            .unwrap();
        let back = mjpg_to_rgb(&jpg, Some((64, 48))).unwrap();
        assert!((back.get_pixel(10, 10).0[0] as i32 - 200).abs() < 6);
        let e = mjpg_to_rgb(&jpg[..jpg.len() / 3], Some((64, 48))).unwrap_err();
        assert!(matches!(e, CaptureError::BadJpeg(_)), "{e}");
        let e = mjpg_to_rgb(&jpg, Some((640, 480))).unwrap_err();
        assert!(e.to_string().contains("640x480"), "{e}");
        assert!(mjpg_to_rgb(b"garbage", None).is_err());
        // Cut just before the end-of-image marker: a lenient decoder would fill the rest.
        let e = mjpg_to_rgb(&jpg[..jpg.len() - 2], None).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        // Zero padding after the marker (some drivers) is fine.
        let mut padded = jpg.clone();
        padded.extend_from_slice(&[0; 64]);
        assert!(mjpg_to_rgb(&padded, Some((64, 48))).is_ok());
    }

    /// A textured field encoded as a camera's MJPG frame (the image crate's encoder, quality
    /// 90), and the pixels the image crate decodes from it.
    fn textured_jpeg(color: image::ColorType) -> (Vec<u8>, RgbImage) {
        let img = RgbImage::from_fn(96, 64, |x, y| {
            let n = (x * 7919 + y * 104729) % 61;
            image::Rgb([(x * 2 + n) as u8, (y * 3 + n) as u8, (x + y + 2 * n) as u8])
        });
        let mut jpg = Vec::new();
        let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 90);
        match color {
            image::ColorType::L8 => {
                let grey = image::DynamicImage::ImageRgb8(img).to_luma8();
                enc.encode(grey.as_raw(), 96, 64, image::ExtendedColorType::L8)
            }
            _ => enc.encode(img.as_raw(), 96, 64, image::ExtendedColorType::Rgb8),
        }
        .unwrap();
        let reference = image::load_from_memory_with_format(&jpg, image::ImageFormat::Jpeg)
            .unwrap()
            .into_rgb8();
        (jpg, reference)
    }

    #[test]
    fn mjpg_decodes_into_a_reused_buffer_the_pixels_the_image_crate_decodes() {
        for color in [image::ColorType::Rgb8, image::ColorType::L8] {
            let (jpg, reference) = textured_jpeg(color);
            assert_eq!(
                mjpg_to_rgb(&jpg, Some((96, 64))).unwrap(),
                reference,
                "{color:?}"
            );
            // A smaller and a larger buffer of other pixels: resized, every pixel written.
            for spare in [vec![7u8; 10], vec![9u8; 3 * 96 * 64 + 500]] {
                let back = mjpg_to_rgb_into(&jpg, Some((96, 64)), spare).unwrap();
                assert_eq!(back, reference, "{color:?}");
            }
            // A buffer of the frame's size is written where it is: no allocation.
            let spare = vec![0u8; 3 * 96 * 64];
            let at = spare.as_ptr();
            let back = mjpg_to_rgb_into(&jpg, Some((96, 64)), spare).unwrap();
            assert_eq!(back.as_raw().as_ptr(), at);
            // A wrong size is refused whatever the buffer.
            let e = mjpg_to_rgb_into(&jpg, Some((64, 48)), vec![0; 3 * 64 * 48]).unwrap_err();
            assert!(e.to_string().contains("96x64"), "{e}");
        }
        // YUYV into a reused buffer: the same pixels as into a new one.
        let yuyv: Vec<u8> = (0..2 * 96 * 64).map(|i| (i * 37 % 251) as u8).collect();
        let fresh = yuyv_to_rgb(&yuyv, 96, 64).unwrap();
        assert_eq!(yuyv_to_rgb_into(&yuyv, 96, 64, vec![1; 77]).unwrap(), fresh);
    }

    #[test]
    fn mjpg_frames_without_huffman_tables_decode_with_the_standard_ones() {
        // Many UVC cameras leave the Huffman tables out of their MJPG frames (the AVI1 format:
        // the decoder takes JPEG's standard tables, which the image crate's encoder uses).
        let (jpg, reference) = textured_jpeg(image::ColorType::Rgb8);
        let mut stripped = jpg[..2].to_vec();
        let mut at = 2;
        let mut dropped = 0;
        while at + 4 <= jpg.len() && jpg[at] == 0xFF && jpg[at + 1] != 0xDA {
            let len = u16::from_be_bytes([jpg[at + 2], jpg[at + 3]]) as usize;
            if jpg[at + 1] == 0xC4 {
                dropped += 1;
            } else {
                stripped.extend_from_slice(&jpg[at..at + 2 + len]);
            }
            at += 2 + len;
        }
        stripped.extend_from_slice(&jpg[at..]);
        assert!(dropped > 0, "the encoder wrote no Huffman table");
        assert_eq!(mjpg_to_rgb(&stripped, Some((96, 64))).unwrap(), reference);
    }

    #[test]
    fn replay_reports_undecodable_files_and_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3]))
            .save(dir.path().join("a.png"))
            .unwrap();
        std::fs::write(dir.path().join("b.png"), b"not a png").unwrap();
        RgbImage::from_pixel(8, 8, image::Rgb([4, 5, 6]))
            .save(dir.path().join("c.png"))
            .unwrap();
        let mut src = ReplaySource::new(&[dir.path().to_path_buf()], false).unwrap();
        assert!(src.next_frame().unwrap().is_some());
        let e = src.next_frame().unwrap_err();
        assert!(e.to_string().contains("b.png"), "{e}");
        assert_eq!(
            src.next_frame().unwrap().unwrap().image.get_pixel(0, 0).0,
            [4, 5, 6]
        );
        assert!(src.next_frame().unwrap().is_none());
    }

    #[test]
    fn missing_camera_is_a_device_error_naming_it() {
        let mut src = V4l2Source::new(
            PathBuf::from("/dev/reddino-no-such-camera"),
            640,
            480,
            PixelFormat::Yuyv,
        );
        for _ in 0..2 {
            let e = src.next_frame().unwrap_err();
            assert!(e.is_device_error());
            assert!(e.to_string().contains("reddino-no-such-camera"), "{e}");
        }
        assert!(src.is_live());
    }

    /// Runs only where REDDINO_V4L2_DEVICE names a capture device (e.g. vivid's /dev/video0).
    #[test]
    fn real_v4l2_device_streams_frames() {
        let Ok(dev) = std::env::var("REDDINO_V4L2_DEVICE") else {
            eprintln!("REDDINO_V4L2_DEVICE not set: skipping the V4L2 device test");
            return;
        };
        for format in [PixelFormat::Yuyv, PixelFormat::Mjpg] {
            let mut src = V4l2Source::new(PathBuf::from(&dev), 640, 480, format);
            match src.next_frame() {
                Ok(Some(f)) => assert!(f.image.width() > 0),
                Ok(None) => panic!("camera ended"),
                // vivid offers YUYV but not MJPG: a refusal must say so.
                Err(e) => assert!(e.to_string().contains("offer"), "{e}"),
            }
        }
    }

    #[test]
    fn synthetic_source_cycles_sources_with_truth() {
        let mut src = SyntheticSource::new(SourcePreset::all(), 320, 240, 0, Some(2));
        let a = src.next_frame().unwrap().unwrap();
        let b = src.next_frame().unwrap().unwrap();
        assert_ne!(a.origin, b.origin);
        assert!(!a.truth.unwrap().is_empty());
        assert!(src.next_frame().unwrap().is_none());
    }

    #[test]
    fn image_files_cut_short_or_too_large_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 3, y as u8 * 5, 90]));
        let jpg = dir.path().join("f.jpg");
        img.save(&jpg).unwrap();
        assert_eq!(decode_image_file(&jpg).unwrap().dimensions(), (64, 48));
        // The same file cut short: refused, not decoded with its missing part filled in.
        let bytes = std::fs::read(&jpg).unwrap();
        let cut = dir.path().join("cut.jpg");
        std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
        let e = decode_image_file(&cut).unwrap_err().to_string();
        assert!(e.contains("truncated JPEG") && e.contains("cut.jpg"), "{e}");
        // Wider than any camera: refused from its header (a 9000 x 1 PNG is tiny on disk).
        let wide = dir.path().join("wide.png");
        RgbImage::new(MAX_IMAGE_SIDE + 808, 1).save(&wide).unwrap();
        let e = decode_image_file(&wide).unwrap_err().to_string();
        assert!(e.contains("wide.png") && e.contains("cannot decode"), "{e}");
        // A PNG named .jpg (data sets have them) is told by its content.
        let png_as_jpg = dir.path().join("png.jpg");
        std::fs::copy(dir.path().join("wide.png"), &png_as_jpg).unwrap();
        let small = dir.path().join("small.png");
        img.save(&small).unwrap();
        std::fs::copy(&small, &png_as_jpg).unwrap();
        assert_eq!(
            decode_image_file(&png_as_jpg).unwrap().dimensions(),
            (64, 48)
        );
    }
}
