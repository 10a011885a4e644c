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
    faiss_IDSelectorBitmap_new, faiss_IDSelector_free, faiss_Index_search,
    faiss_Index_search_with_params, faiss_SearchParameters_free, faiss_SearchParameters_new,
    faiss_get_last_error, idx_t, FaissIDSelector, FaissIDSelectorBitmap, FaissSearchParameters,
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

/// Searches one query; `allow` is an `IDSelectorBitmap` bitmap (bit `id` = allowed).
/// Returns distances and ids (`-1` where fewer than `k` results exist).
pub(super) fn search<I: NativeIndex<Inner = faiss_sys::FaissIndex>>(
    index: &I,
    query: &[f32],
    k: usize,
    allow: Option<&[u8]>,
) -> Result<(Vec<f32>, Vec<idx_t>)> {
    let mut distances = vec![0f32; k];
    let mut labels: Vec<idx_t> = vec![-1; k];
    let ptr = index.inner_ptr();
    // SAFETY: `ptr` is a live index owned by `index`, borrowed for the whole call; the query
    // has `d` floats (checked by the caller); the output buffers hold `k` entries each. The
    // selector and parameters are created here, outlive the search, and are freed here; the
    // bitmap they point into is borrowed for the whole call.
    unsafe {
        match allow {
            None => check(faiss_Index_search(
                ptr,
                1,
                query.as_ptr(),
                k as idx_t,
                distances.as_mut_ptr(),
                labels.as_mut_ptr(),
            ))?,
            Some(bitmap) => {
                let mut sel: *mut FaissIDSelectorBitmap = std::ptr::null_mut();
                check(faiss_IDSelectorBitmap_new(
                    &mut sel,
                    bitmap.len(),
                    bitmap.as_ptr(),
                ))?;
                let mut params: *mut FaissSearchParameters = std::ptr::null_mut();
                let made = check(faiss_SearchParameters_new(
                    &mut params,
                    sel as *mut FaissIDSelector,
                ));
                let result = made.and_then(|_| {
                    check(faiss_Index_search_with_params(
                        ptr,
                        1,
                        query.as_ptr(),
                        k as idx_t,
                        params,
                        distances.as_mut_ptr(),
                        labels.as_mut_ptr(),
                    ))
                });
                if !params.is_null() {
                    faiss_SearchParameters_free(params);
                }
                faiss_IDSelector_free(sel as *mut FaissIDSelector);
                result?;
            }
        }
    }
    Ok((distances, labels))
}
