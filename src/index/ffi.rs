//! Concurrent search through the FAISS C API.
//!
//! The safe `faiss` crate only searches an `IndexImpl` through `&mut self`, which would
//! serialise every query of the database behind one lock. FAISS's `Index::search` is a `const`
//! method, safe to call from many threads at once while no thread mutates the index; the
//! database guarantees that with a read/write lock around the index (searches hold the read
//! side, mutations the write side).
#![allow(unsafe_code)]

use std::ffi::CStr;

use faiss::index::NativeIndex;
use faiss_sys::{
    faiss_IDSelectorBatch_new, faiss_IDSelectorBitmap_new, faiss_IDSelectorNot_new,
    faiss_IDSelector_free, faiss_Index_search, faiss_Index_search_with_params,
    faiss_SearchParameters_free, faiss_SearchParameters_new, faiss_get_last_error, idx_t,
    FaissIDSelector, FaissIDSelectorBatch, FaissIDSelectorBitmap, FaissIDSelectorNot,
    FaissSearchParameters,
};

use crate::error::{Error, Result};

fn check(code: std::os::raw::c_int) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: FAISS returns a thread-local, NUL-terminated message (or null).
    let msg = unsafe {
        let p = faiss_get_last_error();
        if p.is_null() {
            "unknown FAISS error".to_string()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    Err(Error::Index(format!("{msg} (code {code})")))
}

/// Keeps a selector FAISS made (for freeing after the search, even when the call that made it
/// failed) and checks that call's return code.
fn kept(
    made: &mut Vec<*mut FaissIDSelector>,
    sel: *mut FaissIDSelector,
    code: std::os::raw::c_int,
) -> Result<*mut FaissIDSelector> {
    made.push(sel);
    check(code).map(|_| sel)
}

/// Which ids a search may return, as a FAISS id selector.
pub(super) enum Selector<'a> {
    /// Every id in the index.
    All,
    /// `IDSelectorBitmap`: bit `id` set means allowed (memory: the largest id / 8).
    Bitmap(&'a [u8]),
    /// `IDSelectorBatch`: only these ids (memory: proportional to their number).
    Only(&'a [idx_t]),
    /// `IDSelectorNot(IDSelectorBatch)`: every id but these.
    AllBut(&'a [idx_t]),
}

/// Searches `n` queries (`queries` holds them one after another) with the ids `selector`
/// allows. Returns `k` distances and ids per query (`-1` where fewer than `k` results exist).
pub(super) fn search<I: NativeIndex<Inner = faiss_sys::FaissIndex>>(
    index: &I,
    queries: &[f32],
    n: usize,
    k: usize,
    selector: Selector<'_>,
) -> Result<(Vec<f32>, Vec<idx_t>)> {
    let mut distances = vec![0f32; n * k];
    let mut labels: Vec<idx_t> = vec![-1; n * k];
    let ptr = index.inner_ptr();
    // Selectors made here, freed at the end (an IDSelectorNot does not own the one it wraps).
    let mut made: Vec<*mut FaissIDSelector> = Vec::new();
    unsafe {
        let sel: Result<Option<*mut FaissIDSelector>> = match selector {
            Selector::All => Ok(None),
            Selector::Bitmap(bitmap) => {
                let mut sel: *mut FaissIDSelectorBitmap = std::ptr::null_mut();
                let code = faiss_IDSelectorBitmap_new(&mut sel, bitmap.len(), bitmap.as_ptr());
                kept(&mut made, sel.cast(), code).map(Some)
            }
            Selector::Only(ids) | Selector::AllBut(ids) => {
                let mut sel: *mut FaissIDSelectorBatch = std::ptr::null_mut();
                let code = faiss_IDSelectorBatch_new(&mut sel, ids.len(), ids.as_ptr());
                let batch = kept(&mut made, sel.cast(), code);
                match selector {
                    Selector::AllBut(_) => batch.and_then(|batch| {
                        let mut not: *mut FaissIDSelectorNot = std::ptr::null_mut();
                        let code = faiss_IDSelectorNot_new(&mut not, batch);
                        kept(&mut made, not.cast(), code)
                    }),
                    _ => batch,
                }
                .map(Some)
            }
        };
        // One query on HNSW: lookalike's own call of FAISS's graph search (see
        // `hnsw.cpp`), which answers 1 for any other kind of index.
        let shim = match (&sel, n) {
            (Ok(sel), 1) => {
                let sel = sel.map_or(std::ptr::null(), |s| s.cast_const().cast());
                match lookalike_hnsw_search(
                    ptr.cast_const().cast(),
                    queries.as_ptr(),
                    k as i64,
                    sel,
                    distances.as_mut_ptr(),
                    labels.as_mut_ptr(),
                ) {
                    0 => Some(Ok(())),
                    1 => None,
                    _ => Some(Err(Error::Index(last_error()))),
                }
            }
            _ => None,
        };
        // One query: no OpenMP team (IndexIDMap's id translation opens a parallel region
        // whatever n is, which wakes the pool's threads to spin on the other cores).
        let threads = if n == 1 {
            1
        } else {
            omp_get_max_threads() as usize
        };
        let result = shim.unwrap_or_else(|| {
            with_threads(threads, || {
                sel.and_then(|sel| match sel {
                    None => check(faiss_Index_search(
                        ptr,
                        n as idx_t,
                        queries.as_ptr(),
                        k as idx_t,
                        distances.as_mut_ptr(),
                        labels.as_mut_ptr(),
                    )),
                    Some(sel) => {
                        let mut params: *mut FaissSearchParameters = std::ptr::null_mut();
                        let r =
                            check(faiss_SearchParameters_new(&mut params, sel)).and_then(|_| {
                                check(faiss_Index_search_with_params(
                                    ptr,
                                    n as idx_t,
                                    queries.as_ptr(),
                                    k as idx_t,
                                    params,
                                    distances.as_mut_ptr(),
                                    labels.as_mut_ptr(),
                                ))
                            });
                        if !params.is_null() {
                            faiss_SearchParameters_free(params);
                        }
                        r
                    }
                })
            })
        });
        // The outer selector (last made) first, then the one it wraps.
        for sel in made.into_iter().rev() {
            if !sel.is_null() {
                faiss_IDSelector_free(sel);
            }
        }
        result?;
    }
    Ok((distances, labels))
}

unsafe extern "C" {
    // src/index/hnsw.cpp (compiled by build.rs).
    fn lookalike_hnsw_search(
        index: *const std::ffi::c_void,
        x: *const f32,
        k: i64,
        sel: *const std::ffi::c_void,
        distances: *mut f32,
        labels: *mut idx_t,
    ) -> std::os::raw::c_int;
    fn lookalike_hnsw_last_error() -> *const std::os::raw::c_char;
    fn lookalike_hnsw_use_own_kernels(index: *mut std::ffi::c_void) -> std::os::raw::c_int;
    fn lookalike_hnsw_prepare_growth(
        index: *const std::ffi::c_void,
        extra: i64,
    ) -> *mut std::ffi::c_void;
    fn lookalike_hnsw_commit_growth(
        index: *mut std::ffi::c_void,
        growth: *mut std::ffi::c_void,
    ) -> std::os::raw::c_int;
    fn lookalike_hnsw_free_growth(growth: *mut std::ffi::c_void);
    fn lookalike_hnsw_own_arrays(index: *mut std::ffi::c_void) -> std::os::raw::c_int;
    // src/index/mapped.cpp.
    fn lookalike_read_mapped(
        graph_fd: std::os::raw::c_int,
        graph_len: u64,
        vectors_fd: std::os::raw::c_int,
        at: u64,
        len: u64,
    ) -> *mut std::ffi::c_void;
    // libgomp, linked with FAISS.
    fn omp_get_max_threads() -> std::os::raw::c_int;
    fn omp_set_num_threads(n: std::os::raw::c_int);
}

/// Gives an HNSW index lookalike's distance kernels (AVX2 and FMA when the CPU has them) for
/// FAISS's own adds and searches (see `hnsw.cpp`); any other index is left as it is.
pub(super) fn use_own_kernels<I: NativeIndex<Inner = faiss_sys::FaissIndex>>(
    index: &mut I,
) -> Result<()> {
    // SAFETY: the index is borrowed mutably, so no other thread uses it while its storage is
    // replaced; the C++ side catches every exception.
    match unsafe { lookalike_hnsw_use_own_kernels(index.inner_ptr().cast()) } {
        0 | 1 => Ok(()),
        _ => Err(Error::Index(last_error())),
    }
}

/// Bigger copies of the arrays an HNSW index's adds grow (see [`prepare_growth`]); after
/// [`commit_growth`], the old arrays, freed when this is dropped.
#[derive(Debug)]
pub(crate) struct Growth(*mut std::ffi::c_void);

// SAFETY: a heap object of `hnsw.cpp` that no other thread refers to.
unsafe impl Send for Growth {}

impl Drop for Growth {
    fn drop(&mut self) {
        // SAFETY: made by lookalike_hnsw_prepare_growth, freed once, here.
        unsafe { lookalike_hnsw_free_growth(self.0) }
    }
}

/// Copies the arrays of a flat or HNSW `index` that adding `extra` vectors would reallocate
/// into bigger ones, reading the index only: the caller keeps writers out and may let searches
/// run. `None` when nothing needs to grow (or for another kind of index).
pub(super) fn prepare_growth<I: NativeIndex<Inner = faiss_sys::FaissIndex>>(
    index: &I,
    extra: usize,
) -> Option<Growth> {
    let extra = i64::try_from(extra).ok()?;
    // SAFETY: a read of an index that no thread mutates meanwhile (the caller's promise).
    let g = unsafe { lookalike_hnsw_prepare_growth(index.inner_ptr().cast_const().cast(), extra) };
    (!g.is_null()).then_some(Growth(g))
}

/// Swaps a [`prepare_growth`]'s arrays into `index`, unless it changed since; then `growth`
/// holds the old arrays. True when swapped.
pub(super) fn commit_growth<I: NativeIndex<Inner = faiss_sys::FaissIndex>>(
    index: &mut I,
    growth: &Growth,
) -> bool {
    // SAFETY: the index is borrowed mutably (no search runs); the swap checks the sizes.
    unsafe { lookalike_hnsw_commit_growth(index.inner_ptr().cast(), growth.0) == 0 }
}

/// Copies the arrays of `index` that are views into a mapped snapshot ([`read_mapped`]) into
/// arrays of its own, so that FAISS can grow them; nothing to do (and cheap) otherwise. True
/// when something was copied.
pub(super) fn own_arrays<I: NativeIndex<Inner = faiss_sys::FaissIndex>>(
    index: &mut I,
) -> Result<bool> {
    // SAFETY: the index is borrowed mutably (no search runs); the C++ side catches every
    // exception.
    match unsafe { lookalike_hnsw_own_arrays(index.inner_ptr().cast()) } {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(Error::Index(last_error())),
    }
}

/// Reads an index whose FAISS stream is `graph[..at] ++ vectors[..len] ++ graph[at..]`
/// (`graph` holds `graph_len` bytes) with the vectors mapped from their file rather than
/// copied (`mapped.cpp`), every page of them mapped now rather than on first use. The
/// stream's sizes must have been checked ([`super::faiss_file::check_sizes`]). The files
/// must not shrink while the index lives (the database's lock keeps other writers out, and a
/// snapshot save only appends to the vectors file or replaces it).
pub(super) fn read_mapped(
    graph: &std::fs::File,
    graph_len: u64,
    vectors: &std::fs::File,
    at: u64,
    len: u64,
) -> Result<faiss::index::IndexImpl> {
    use faiss::index::FromInnerPtr;
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptors are open for the call; the C++ side catches every exception and
    // returns an index we then own, or null.
    unsafe {
        let out = lookalike_read_mapped(graph.as_raw_fd(), graph_len, vectors.as_raw_fd(), at, len);
        if out.is_null() {
            return Err(Error::Index(last_error()));
        }
        Ok(faiss::index::IndexImpl::from_inner_ptr(out.cast()))
    }
}

/// This thread's last error message from `hnsw.cpp`.
fn last_error() -> String {
    // SAFETY: a NUL-terminated string owned by the C++ side, valid until its next call on this
    // thread.
    unsafe {
        CStr::from_ptr(lookalike_hnsw_last_error())
            .to_string_lossy()
            .into_owned()
    }
}

/// Runs `f` with FAISS's OpenMP parallel regions on this thread limited to `threads` threads
/// (an OpenMP setting of the calling thread only), then restores the setting.
pub(super) fn with_threads<T>(threads: usize, f: impl FnOnce() -> T) -> T {
    let n = std::os::raw::c_int::try_from(threads.max(1)).unwrap_or(std::os::raw::c_int::MAX);
    // SAFETY: plain calls into the OpenMP runtime that read and set a per-thread value.
    let before = unsafe { omp_get_max_threads() };
    unsafe { omp_set_num_threads(n) };
    let out = f();
    unsafe { omp_set_num_threads(before) };
    out
}

/// Fits FAISS's `PCAMatrix` (no whitening, no rotation) on `n` rows of `sample` (`d_in`
/// floats each) and returns it as plain numbers: `matrix` (`d_in x d_out`, row-major) and
/// `bias` (`d_out`), with `y = x * matrix + bias` the projection of row `x` (the mean is
/// folded into the bias). The C API has no getter for the matrix, so it is read back by
/// applying the fitted transform to the zero vector (the bias) and to each unit vector (a row
/// of the matrix plus the bias): exact up to float rounding.
pub(super) fn pca_fit(
    sample: &[f32],
    n: usize,
    d_in: usize,
    d_out: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    use faiss_sys::{
        faiss_PCAMatrix_new_with, faiss_VectorTransform_apply_noalloc, faiss_VectorTransform_free,
        faiss_VectorTransform_train, FaissPCAMatrix,
    };
    if sample.len() != n * d_in || d_out == 0 || d_out > d_in || n < d_out {
        return Err(Error::Index(format!(
            "a PCA from {d_in} to {d_out} dimensions needs at least {d_out} sample rows of \
             {d_in} floats; got {} floats for {n} rows",
            sample.len()
        )));
    }
    let too_big = |_| Error::Index(format!("a PCA of {d_in} dimensions is too large"));
    let (c_in, c_out) = (
        std::os::raw::c_int::try_from(d_in).map_err(too_big)?,
        std::os::raw::c_int::try_from(d_out).map_err(too_big)?,
    );
    /// Frees the transform however the fit ends.
    struct Owned(*mut FaissPCAMatrix);
    impl Drop for Owned {
        fn drop(&mut self) {
            if !self.0.is_null() {
                // SAFETY: made by faiss_PCAMatrix_new_with and freed once, here.
                unsafe { faiss_VectorTransform_free(self.0) }
            }
        }
    }
    let mut probe = vec![0f32; (d_in + 1) * d_in];
    for i in 0..d_in {
        probe[(i + 1) * d_in + i] = 1.0;
    }
    let mut out = vec![0f32; (d_in + 1) * d_out];
    // SAFETY: the pointers are to live buffers of the sizes FAISS reads and writes
    // (`n * d_in` in, `(d_in + 1) * d_in` in and `(d_in + 1) * d_out` out), and the transform
    // is used only while `owned` keeps it.
    unsafe {
        let mut owned = Owned(std::ptr::null_mut());
        check(faiss_PCAMatrix_new_with(&mut owned.0, c_in, c_out, 0.0, 0))?;
        check(faiss_VectorTransform_train(
            owned.0,
            n as idx_t,
            sample.as_ptr(),
        ))?;
        faiss_VectorTransform_apply_noalloc(
            owned.0,
            (d_in + 1) as idx_t,
            probe.as_ptr(),
            out.as_mut_ptr(),
        );
    }
    let bias = out[..d_out].to_vec();
    let mut matrix = out.split_off(d_out);
    for row in matrix.chunks_mut(d_out) {
        row.iter_mut().zip(&bias).for_each(|(m, b)| *m -= b);
    }
    Ok((matrix, bias))
}

/// Takes each write FAISS makes: its bytes and the size of one item in them (FAISS writes a
/// vector's data in one call, so a call of 1-byte items is a byte vector). False fails the
/// write.
pub(super) type Sink<'a> = dyn FnMut(&[u8], usize) -> bool + 'a;
/// Fills each buffer FAISS reads into, completely; false fails the read.
pub(super) type Source<'a> = dyn FnMut(&mut [u8]) -> bool + 'a;

/// One call of FAISS's custom reader or writer: `len` bytes at `ptr`, in items of `size`.
type Transfer<'a> = dyn FnMut(*mut u8, usize, usize) -> bool + 'a;

thread_local! {
    /// What [`with_transfer`] installed for this thread's FAISS call (FAISS's custom reader
    /// and writer take a bare function pointer, with no room for state).
    static TRANSFER: std::cell::Cell<Option<*mut Transfer<'static>>> =
        const { std::cell::Cell::new(None) };
}

/// Both callbacks: hands the call to the thread's [`Transfer`]; `nitems` when it succeeds, 0
/// (FAISS then throws, and the C API returns an error) when it fails or panics.
fn transfer(ptr: *mut u8, size: usize, nitems: usize) -> usize {
    let Some(len) = size.checked_mul(nitems) else {
        return 0;
    };
    let ok = TRANSFER.with(|t| match t.get() {
        // SAFETY: set by `with_transfer` for the duration of its FAISS call on this thread.
        Some(f) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
            (*f)(ptr, size, len)
        }))
        .unwrap_or(false),
        None => false,
    });
    if ok {
        nitems
    } else {
        0
    }
}

unsafe extern "C" fn write_callback(
    ptr: *const std::ffi::c_void,
    size: usize,
    nitems: usize,
) -> usize {
    transfer(ptr.cast::<u8>().cast_mut(), size, nitems)
}

unsafe extern "C" fn read_callback(
    ptr: *mut std::ffi::c_void,
    size: usize,
    nitems: usize,
) -> usize {
    transfer(ptr.cast::<u8>(), size, nitems)
}

/// Runs `call` (a FAISS call on this thread) with `f` taking its reads or writes.
fn with_transfer<R>(f: &mut Transfer<'_>, call: impl FnOnce() -> R) -> R {
    /// Clears the thread's transfer however the call ends.
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            TRANSFER.with(|t| t.set(None));
        }
    }
    // SAFETY: the pointer is only used during `call`, on this thread, while `f` is borrowed;
    // `Clear` removes it before the borrow ends.
    let ptr: *mut Transfer<'static> = unsafe { std::mem::transmute(f as *mut Transfer<'_>) };
    TRANSFER.with(|t| t.set(Some(ptr)));
    let _clear = Clear;
    call()
}

/// Serialises `index` in FAISS's format through `sink` (see [`Sink`]).
pub(super) fn write_index_to<I: NativeIndex<Inner = faiss_sys::FaissIndex>>(
    index: &I,
    sink: &mut Sink<'_>,
) -> Result<()> {
    let mut f = |ptr: *mut u8, size: usize, len: usize| {
        let bytes: &[u8] = if len == 0 || ptr.is_null() {
            &[]
        } else {
            // SAFETY: FAISS passes `len` bytes at `ptr`, valid for this call.
            unsafe { std::slice::from_raw_parts(ptr, len) }
        };
        sink(bytes, size)
    };
    with_transfer(&mut f, || {
        let mut writer: *mut faiss_sys::FaissCustomIOWriter = std::ptr::null_mut();
        // SAFETY: FAISS fills `writer`; it is freed below whatever the write returns.
        unsafe {
            check(faiss_sys::faiss_CustomIOWriter_new(
                &mut writer,
                Some(write_callback),
            ))?;
            let code = faiss_sys::faiss_write_index_custom(
                index.inner_ptr(),
                writer.cast::<faiss_sys::FaissIOWriter>(),
                0,
            );
            faiss_sys::faiss_CustomIOWriter_free(writer);
            check(code)
        }
    })
}

/// Reads an index in FAISS's format from `source` (see [`Source`]).
pub(super) fn read_index_from(source: &mut Source<'_>) -> Result<faiss::index::IndexImpl> {
    use faiss::index::FromInnerPtr;
    let mut f = |ptr: *mut u8, _size: usize, len: usize| {
        if len == 0 {
            return true;
        }
        if ptr.is_null() {
            return false;
        }
        // SAFETY: FAISS passes a buffer of `len` bytes at `ptr` to fill.
        source(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
    };
    with_transfer(&mut f, || {
        let mut reader: *mut faiss_sys::FaissCustomIOReader = std::ptr::null_mut();
        let mut out: *mut faiss_sys::FaissIndex = std::ptr::null_mut();
        // SAFETY: FAISS fills `reader` and, on success, `out` with an index we then own.
        unsafe {
            check(faiss_sys::faiss_CustomIOReader_new(
                &mut reader,
                Some(read_callback),
            ))?;
            let code = faiss_sys::faiss_read_index_custom(
                reader.cast::<faiss_sys::FaissIOReader>(),
                0,
                &mut out,
            );
            faiss_sys::faiss_CustomIOReader_free(reader);
            check(code)?;
            if out.is_null() {
                return Err(Error::Index("FAISS read no index".into()));
            }
            Ok(faiss::index::IndexImpl::from_inner_ptr(out))
        }
    })
}
