//! Reading a checkpoint's weights: the safetensors shards memory-mapped, each tensor the model
//! asks for converted once to the compute dtype, in parallel, straight into its final buffer.
//!
//! candle's own mmap loader copies every tensor out of the map in the file's dtype, then
//! converts that copy: at full size (bf16 on disk, f32 on the CPU) ~34 s and a peak of ~17 GB,
//! the f32 weights plus every mapped page of the file. Here the conversion reads the map and
//! writes the destination in one pass, and hands each converted stretch of the map back to the
//! kernel at once, so the peak is the weights in their compute dtype and little more
//! (BENCHMARKS.md, Loading).

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Shape, Tensor, WithDType};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};

use super::config::ColPaliConfig;
use super::model::ColPaliModel;
use super::EmbedError;

/// Elements converted per task: large enough to amortise scheduling, small enough that the
/// mapped pages waiting to be released stay a few MB.
const CHUNK: usize = 1 << 20;

/// One tensor the model asks for: its name in the checkpoint and the shape it expects.
#[derive(Debug, Clone, PartialEq)]
pub struct Wanted {
    pub name: String,
    pub shape: Vec<usize>,
}

/// A `VarBuilder` backend that records what the model asks for and hands back zero-sized
/// broadcasts (no memory), so the model can be "built" at any size to learn its tensors.
struct Recorder(Mutex<Vec<Wanted>>);

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("recorder poisoned".into()))?
            .push(Wanted {
                name: name.to_string(),
                shape: s.dims().to_vec(),
            });
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("the model must give a shape for {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Every tensor `ColPaliModel::new` asks for at this configuration, in the order it asks.
pub fn wanted(cfg: &ColPaliConfig) -> candle_core::Result<Vec<Wanted>> {
    let recorder = std::sync::Arc::new(Recorder(Mutex::new(Vec::new())));
    struct Shared(std::sync::Arc<Recorder>);
    impl SimpleBackend for Shared {
        fn get(
            &self,
            s: Shape,
            n: &str,
            h: candle_nn::Init,
            d: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.0.get(s, n, h, d, dev)
        }
        fn get_unchecked(&self, n: &str, d: DType, dev: &Device) -> candle_core::Result<Tensor> {
            self.0.get_unchecked(n, d, dev)
        }
        fn contains_tensor(&self, n: &str) -> bool {
            self.0.contains_tensor(n)
        }
    }
    let vb = VarBuilder::from_backend(Box::new(Shared(recorder.clone())), DType::F32, Device::Cpu);
    ColPaliModel::new(cfg, vb)?;
    let asked = recorder
        .0
        .lock()
        .map_err(|_| candle_core::Error::Msg("recorder poisoned".into()))?
        .clone();
    Ok(asked)
}

/// One memory-mapped shard.
struct Shard {
    path: PathBuf,
    map: Mmap,
}

/// Where one tensor lies: its shard, its dtype on disk, its shape, its bytes in the map.
struct Located<'a> {
    shard: &'a Shard,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: &'a [u8],
}

fn weights_error(path: &Path, message: impl Into<String>) -> EmbedError {
    EmbedError::Weights {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Reads the tensors the model asks for from the shards, in `dtype` on `device`. Logs progress
/// once a second when it takes longer than a second.
pub fn load(
    files: &[PathBuf],
    wanted: &[Wanted],
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>, EmbedError> {
    let mut shards = Vec::with_capacity(files.len());
    for path in files {
        let file = std::fs::File::open(path).map_err(|e| weights_error(path, e.to_string()))?;
        // SAFETY: mapped read-only; a checkpoint modified while loading is not supported (the
        // contract of every safetensors loader).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| weights_error(path, e.to_string()))?;
        shards.push(Shard {
            path: path.clone(),
            map,
        });
    }
    let mut index: HashMap<String, Located> = HashMap::new();
    for shard in &shards {
        let st = SafeTensors::deserialize(&shard.map)
            .map_err(|e| weights_error(&shard.path, format!("not a safetensors file: {e}")))?;
        for (name, view) in st.tensors() {
            index.insert(
                name,
                Located {
                    shard,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    bytes: view.data(),
                },
            );
        }
    }
    let first = files.first().cloned().unwrap_or_default();
    let mut jobs = Vec::with_capacity(wanted.len());
    for w in wanted {
        let Some(t) = index.get(&w.name) else {
            return Err(weights_error(&first, format!("no tensor `{}`", w.name)));
        };
        if t.shape != w.shape {
            return Err(weights_error(
                &t.shard.path,
                format!(
                    "`{}` has shape {:?}; the configuration needs {:?} (config.json and the weights are of different models)",
                    w.name, t.shape, w.shape
                ),
            ));
        }
        if !matches!(t.dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32) {
            return Err(weights_error(
                &t.shard.path,
                format!(
                    "`{}` is {:?}; only BF16, F16 and F32 weights are read",
                    w.name, t.dtype
                ),
            ));
        }
        jobs.push((w, t));
    }
    // Largest first, so the two cores finish together.
    jobs.sort_by_key(|(_, t)| std::cmp::Reverse(t.bytes.len()));

    let total: u64 = jobs.iter().map(|(_, t)| t.bytes.len() as u64).sum();
    let done = AtomicU64::new(0);
    let finished = AtomicBool::new(false);
    let started = Instant::now();
    let converted = std::thread::scope(|scope| {
        scope.spawn(|| report_progress(&done, &finished, total, started));
        let out = jobs
            .par_iter()
            .map(|(w, t)| {
                convert(t, dtype, device, &done)
                    .map(|tensor| (w.name.clone(), tensor))
                    .map_err(|e| weights_error(&t.shard.path, format!("`{}`: {e}", w.name)))
            })
            .collect::<Result<HashMap<_, _>, _>>();
        finished.store(true, Ordering::Relaxed);
        out
    })?;
    tracing::info!(
        tensors = converted.len(),
        gb_read = %format!("{:.2}", total as f64 / 1e9),
        secs = %format!("{:.2}", started.elapsed().as_secs_f64()),
        "weights loaded"
    );
    Ok(converted)
}

/// A line a second while a load that takes longer than a second runs.
fn report_progress(done: &AtomicU64, finished: &AtomicBool, total: u64, started: Instant) {
    let mut next = Duration::from_secs(1);
    while !finished.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
        if started.elapsed() >= next {
            let d = done.load(Ordering::Relaxed);
            tracing::info!(
                "loading ColPali weights: {:.1} of {:.1} GB read ({:.0}%)",
                d as f64 / 1e9,
                total as f64 / 1e9,
                100.0 * d as f64 / total.max(1) as f64
            );
            next += Duration::from_secs(1);
        }
    }
}

/// One tensor in `dtype` on `device`.
fn convert(
    t: &Located,
    dtype: DType,
    device: &Device,
    done: &AtomicU64,
) -> candle_core::Result<Tensor> {
    let same = matches!(
        (t.dtype, dtype),
        (Dtype::BF16, DType::BF16) | (Dtype::F16, DType::F16) | (Dtype::F32, DType::F32)
    );
    if same && !device.is_cpu() {
        // Straight from the map to the device.
        let tensor = Tensor::from_raw_buffer(t.bytes, dtype, &t.shape, device)?;
        release(t.shard, t.bytes);
        done.fetch_add(t.bytes.len() as u64, Ordering::Relaxed);
        return Ok(tensor);
    }
    let host = match dtype {
        DType::F32 => host_tensor::<f32>(t, done)?,
        DType::BF16 => host_tensor::<bf16>(t, done)?,
        DType::F16 => host_tensor::<f16>(t, done)?,
        other => candle_core::bail!("compute dtype {other:?} is not supported"),
    };
    // On a GPU the host copy lives only until it is uploaded.
    host.to_device(device)
}

/// An element type the weights can be converted to.
trait Element: WithDType + Send + Sync {
    fn from_f32(x: f32) -> Self;
    /// Converts `src` (little-endian `dtype` values) into `dst`, which has room for exactly them.
    fn fill(dst: &mut [MaybeUninit<Self>], src: &[u8], dtype: Dtype) {
        fill_via_f32(dst, src, dtype);
    }
}

impl Element for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for bf16 {
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn fill(dst: &mut [MaybeUninit<Self>], src: &[u8], dtype: Dtype) {
        if dtype != Dtype::BF16 {
            return fill_via_f32(dst, src, dtype);
        }
        for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
            d.write(bf16::from_le_bytes([s[0], s[1]]));
        }
    }
}

impl Element for f16 {
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn fill(dst: &mut [MaybeUninit<Self>], src: &[u8], dtype: Dtype) {
        if dtype != Dtype::F16 {
            return fill_via_f32(dst, src, dtype);
        }
        for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
            d.write(f16::from_le_bytes([s[0], s[1]]));
        }
    }
}

/// Any source dtype, through f32 (exact for bf16 and f16).
fn fill_via_f32<T: Element>(dst: &mut [MaybeUninit<T>], src: &[u8], dtype: Dtype) {
    match dtype {
        Dtype::BF16 => match bytemuck::try_cast_slice::<u8, u16>(src)
            .ok()
            .filter(|_| cfg!(target_endian = "little"))
        {
            // The common case (bf16 on disk, f32 on the CPU), on aligned data: a loop the
            // compiler vectorises.
            Some(words) => {
                for (d, &w) in dst.iter_mut().zip(words) {
                    d.write(T::from_f32(f32::from_bits((w as u32) << 16)));
                }
            }
            None => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    let w = u16::from_le_bytes([s[0], s[1]]);
                    d.write(T::from_f32(f32::from_bits((w as u32) << 16)));
                }
            }
        },
        Dtype::F16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                d.write(T::from_f32(f16::from_le_bytes([s[0], s[1]]).to_f32()));
            }
        }
        _ => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                d.write(T::from_f32(f32::from_le_bytes([s[0], s[1], s[2], s[3]])));
            }
        }
    }
}

/// The tensor converted into a buffer of its own on the CPU, chunk by chunk across the cores.
fn host_tensor<T: Element>(t: &Located, done: &AtomicU64) -> candle_core::Result<Tensor> {
    let n: usize = t.shape.iter().product();
    let src_size = match t.dtype {
        Dtype::F32 => 4,
        _ => 2,
    };
    if t.bytes.len() != n * src_size {
        candle_core::bail!("{} bytes for {n} {:?} values", t.bytes.len(), t.dtype);
    }
    let mut out: Vec<T> = Vec::with_capacity(n);
    prefer_huge_pages(out.spare_capacity_mut());
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(CHUNK)
        .zip(t.bytes.par_chunks(CHUNK * src_size))
        .for_each(|(dst, src)| {
            T::fill(dst, src, t.dtype);
            release(t.shard, src);
            done.fetch_add(src.len() as u64, Ordering::Relaxed);
        });
    // SAFETY: the chunks above cover 0..n exactly (the same chunk count on both sides: n
    // elements and n·src_size bytes), and `fill` writes every element of its chunk.
    unsafe { out.set_len(n) };
    Tensor::from_vec(out, t.shape.as_slice(), &Device::Cpu)
}

/// Drops the map's pages that lie wholly inside `bytes` from this process (they stay in the page
/// cache): what has been converted is not read again, and would otherwise count in the
/// process's memory until the end of the load.
fn release(shard: &Shard, bytes: &[u8]) {
    #[cfg(unix)]
    {
        let page = page_size();
        let base = shard.map.as_ptr() as usize;
        let start = (bytes.as_ptr() as usize).next_multiple_of(page);
        let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
        if end > start && start >= base {
            // SAFETY: the range lies inside the read-only file mapping (page-aligned, within
            // `bytes`); MADV_DONTNEED on it only drops this process's page-table entries, and a
            // later read would fault the same file pages back in.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (shard, bytes);
}

#[cfg(unix)]
fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// Asks for transparent huge pages for a large fresh buffer: 2 MB pages cut the page faults of
/// writing the weights by 512× (where THP is in `madvise` mode, as on most distributions).
fn prefer_huge_pages<T>(buf: &mut [MaybeUninit<T>]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = std::mem::size_of_val(buf);
        if bytes < 4 * HUGE {
            return;
        }
        let start = (buf.as_ptr() as usize).next_multiple_of(HUGE);
        let end = (buf.as_ptr() as usize + bytes) / HUGE * HUGE;
        if end > start {
            // SAFETY: advisory only, on memory this buffer owns.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}
