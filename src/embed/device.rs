//! The one place where the device and the dtype are chosen.

use candle_core::{DType, Device};

use crate::config::{DeviceChoice, DtypeChoice};

use super::EmbedError;

/// Where the model runs, in which precision, and whether `auto` had to settle for the CPU.
#[derive(Debug, Clone)]
pub struct DeviceSelection {
    pub device: Device,
    pub dtype: DType,
    pub fell_back_to_cpu: bool,
    /// Why this device and this dtype, in words: what `status` and `doctor` show.
    pub reason: String,
}

/// `auto`: Metal, else CUDA, else the CPU with a warning. A forced GPU that is not there (or not
/// compiled in) is an error that says how to get it.
pub fn select(device: DeviceChoice, dtype: DtypeChoice) -> Result<DeviceSelection, EmbedError> {
    let (device, fell_back_to_cpu, device_why) = match device {
        DeviceChoice::Cpu => (
            Device::Cpu,
            false,
            "device = cpu, forced by configuration".to_string(),
        ),
        DeviceChoice::Metal => (
            metal()?,
            false,
            "device = metal, forced by configuration".to_string(),
        ),
        DeviceChoice::Cuda => (
            cuda()?,
            false,
            "device = cuda, forced by configuration".to_string(),
        ),
        DeviceChoice::Auto => match (metal(), cuda()) {
            (Ok(d), _) => (d, false, "device = auto, Metal found".to_string()),
            (_, Ok(d)) => (d, false, "device = auto, CUDA GPU 0 found".to_string()),
            (Err(m), Err(c)) => {
                // Only the back-ends this build has can explain why they were not used.
                let why = match (cfg!(feature = "metal"), cfg!(feature = "cuda")) {
                    (false, false) => "this build has no GPU back-end".to_string(),
                    (true, false) => bare(&m),
                    (false, true) => bare(&c),
                    (true, true) => format!("{}; {}", bare(&m), bare(&c)),
                };
                let why = format!("device = auto and no GPU: {why}");
                tracing::warn!(
                    "ColPali runs on the CPU, much more slowly ({why}); build with `--features metal` or \
                     `--features cuda` (make cuda-build) for a GPU"
                );
                (Device::Cpu, true, why)
            }
        },
    };
    if matches!(device, Device::Cpu) {
        keep_freed_memory_for_reuse();
    }
    let (dtype, dtype_why) = match (dtype, &device) {
        (DtypeChoice::F32, _) => (DType::F32, "dtype = f32"),
        (DtypeChoice::F16, _) => (DType::F16, "dtype = f16"),
        (DtypeChoice::Bf16, _) => (DType::BF16, "dtype = bf16"),
        (DtypeChoice::Auto, Device::Cpu) => (DType::F32, "dtype = auto: f32 on the CPU"),
        (DtypeChoice::Auto, _) => (DType::BF16, "dtype = auto: bf16 on a GPU"),
    };
    Ok(DeviceSelection {
        device,
        dtype,
        fell_back_to_cpu,
        reason: format!("{device_why}; {dtype_why}"),
    })
}

/// An `EmbedError::Device`'s message without the "device: " its Display adds.
fn bare(e: &EmbedError) -> String {
    match e {
        EmbedError::Device(m) => m.clone(),
        other => other.to_string(),
    }
}

#[cfg(feature = "metal")]
fn metal() -> Result<Device, EmbedError> {
    Device::new_metal(0).map_err(|e| EmbedError::Device(format!("no usable Metal device: {e}")))
}

#[cfg(not(feature = "metal"))]
fn metal() -> Result<Device, EmbedError> {
    Err(EmbedError::Device(
        "this build has no Metal support: rebuild with `cargo build --release --features metal`"
            .into(),
    ))
}

#[cfg(feature = "cuda")]
fn cuda() -> Result<Device, EmbedError> {
    Device::new_cuda(0).map_err(|e| {
        // candle appends a backtrace to some errors: the first line is the cause.
        let cause = e.to_string();
        let cause = cause.lines().next().unwrap_or_default().trim().to_string();
        EmbedError::Device(format!(
            "no usable CUDA device: {cause} (is the NVIDIA driver, version 580 or newer, installed? `nvidia-smi` tells)"
        ))
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda() -> Result<Device, EmbedError> {
    Err(EmbedError::Device(
        "this build has no CUDA support: rebuild with `cargo build --release --features cuda`"
            .into(),
    ))
}

/// "cpu", "cuda:0", "metal".
pub fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda:0".into(),
        Device::Metal(_) => "metal".into(),
    }
}

pub fn dtype_name(dtype: DType) -> String {
    match dtype {
        DType::F32 => "f32".into(),
        DType::BF16 => "bf16".into(),
        DType::F16 => "f16".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// candle reads two CPU settings from the environment; this sets them, unless the user did,
/// before any candle op runs. Call it in `main` before anything else starts, while the process
/// has one thread: changing the environment while other threads may read it is unsound.
///
/// - `CANDLE_BARRIER_POOL_SPIN_LIMIT`: after each element-wise op candle's helper threads
///   busy-wait 25,000 spins before sleeping. A background agent must not busy-wait, and on a
///   few cores the spinning thread takes the core the next matrix product needs (a batch of
///   queries was 12% slower on 2 cores; BENCHMARKS.md, ColPali). 1: sleep at once.
/// - `RAYON_NUM_THREADS`: unless it is set, candle counts the physical cores again, by reading
///   `/proc/cpuinfo`, on every matrix product. Set to that same count, once; rayon's pool, which
///   the matrix products run on, then has one thread per physical core too.
pub fn set_cpu_thread_env() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1");
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
    }
}

/// Every candle op on the CPU allocates its output; glibc serves large blocks with fresh `mmap`s
/// and unmaps them on free, so each forward pays a page fault per 4 KiB of every activation
/// (~10% of a page's time, measured). Raising the thresholds keeps freed blocks in the heap for
/// the next forward. Process-wide, and only ever raises the memory kept to the peak in use.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory_for_reuse() {
    // SAFETY: mallopt only changes allocator tuning parameters; any value is valid.
    unsafe {
        // Above the largest threshold glibc accepts (32 MiB), no mmap at all: the heap serves
        // every block, and keeps what is freed.
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory_for_reuse() {}
