// lookalike's additions to FAISS's HNSW (src/index/ffi.rs).
//
// FAISS 1.12, as faiss-sys builds it, measures distances with kernels compiled without SIMD
// flags, and its IndexHNSW::search allocates and zeroes a visited table of one byte per stored
// vector on every call (1 MB at 1M): together a third of a one-query search at a million
// vectors (docs/benchmarks.md, "Session 15"). This file gives an HNSW index
//   - a flat storage whose distance computer uses AVX2 and FMA when the CPU has them (chosen at
//     run time; FAISS's portable kernels otherwise): FAISS's own adds and searches use it
//     (lookalike_hnsw_use_own_kernels);
//   - a one-query search that runs FAISS's own HNSW::search with a visited table kept per
//     thread and reused (FAISS's VisitedTable clears itself every 250 searches)
//     (lookalike_hnsw_search). Ids and distances are what IndexIDMap::search returns, up to
//     float rounding of the distances.
//
// Every C++ exception stops here: the functions return a code, and the message is kept for
// lookalike_hnsw_last_error.

#include <faiss/Index.h>
#include <faiss/IndexFlat.h>
#include <faiss/IndexFlatCodes.h>
#include <faiss/IndexHNSW.h>
#include <faiss/IndexIDMap.h>
#include <faiss/impl/AuxIndexStructures.h>
#include <faiss/impl/DistanceComputer.h>
#include <faiss/impl/IDSelector.h>
#include <faiss/impl/ResultHandler.h>
#include <faiss/utils/distances.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// The layouts used here (VisitedTable, IndexIDMap, IndexHNSW, the result handler) are those of
// the FAISS that faiss-sys 0.7.0 builds; build.rs compiles this file with that build's headers.
static_assert(
        FAISS_VERSION_MAJOR == 1 && FAISS_VERSION_MINOR == 12 &&
                FAISS_VERSION_PATCH == 0,
        "src/index/hnsw.cpp is written for FAISS 1.12.0 (faiss-sys 0.7.0)");

namespace {

thread_local std::string last_error;

using faiss::idx_t;

// ---- distance kernels --------------------------------------------------------------------

struct Kernels {
    float (*one)(const float* x, const float* y, size_t d);
    void (*four)(
            const float* x,
            const float* y0,
            const float* y1,
            const float* y2,
            const float* y3,
            size_t d,
            float* out);
};

// FAISS's portable kernels: squared L2 distance (Ip = false) or inner product (Ip = true).
template <bool Ip>
float one_portable(const float* x, const float* y, size_t d) {
    return Ip ? faiss::fvec_inner_product(x, y, d) : faiss::fvec_L2sqr(x, y, d);
}

template <bool Ip>
void four_portable(
        const float* x,
        const float* y0,
        const float* y1,
        const float* y2,
        const float* y3,
        size_t d,
        float* out) {
    if (Ip) {
        faiss::fvec_inner_product_batch_4(
                x, y0, y1, y2, y3, d, out[0], out[1], out[2], out[3]);
    } else {
        faiss::fvec_L2sqr_batch_4(x, y0, y1, y2, y3, d, out[0], out[1], out[2], out[3]);
    }
}

#if defined(__x86_64__)

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Squared L2 distance (Ip = false) or inner product (Ip = true) between x and y.
template <bool Ip>
__attribute__((target("avx2,fma"))) float one_avx2(
        const float* x,
        const float* y,
        size_t d) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 16 <= d; i += 16) {
        __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
        __m256 y0 = _mm256_loadu_ps(y + i), y1 = _mm256_loadu_ps(y + i + 8);
        if (Ip) {
            a0 = _mm256_fmadd_ps(x0, y0, a0);
            a1 = _mm256_fmadd_ps(x1, y1, a1);
        } else {
            __m256 t0 = _mm256_sub_ps(x0, y0), t1 = _mm256_sub_ps(x1, y1);
            a0 = _mm256_fmadd_ps(t0, t0, a0);
            a1 = _mm256_fmadd_ps(t1, t1, a1);
        }
    }
    for (; i + 8 <= d; i += 8) {
        __m256 x0 = _mm256_loadu_ps(x + i), y0 = _mm256_loadu_ps(y + i);
        if (Ip) {
            a0 = _mm256_fmadd_ps(x0, y0, a0);
        } else {
            __m256 t0 = _mm256_sub_ps(x0, y0);
            a0 = _mm256_fmadd_ps(t0, t0, a0);
        }
    }
    float s = hsum(_mm256_add_ps(a0, a1));
    for (; i < d; i++) {
        s += Ip ? x[i] * y[i] : (x[i] - y[i]) * (x[i] - y[i]);
    }
    return s;
}

// Four distances at once: the four vectors' loads are in flight together, which is most of
// the gain on vectors that are not in cache.
template <bool Ip>
__attribute__((target("avx2,fma"))) void four_avx2(
        const float* x,
        const float* y0,
        const float* y1,
        const float* y2,
        const float* y3,
        size_t d,
        float* out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 8 <= d; i += 8) {
        __m256 q = _mm256_loadu_ps(x + i);
        __m256 v0 = _mm256_loadu_ps(y0 + i), v1 = _mm256_loadu_ps(y1 + i);
        __m256 v2 = _mm256_loadu_ps(y2 + i), v3 = _mm256_loadu_ps(y3 + i);
        if (Ip) {
            a0 = _mm256_fmadd_ps(q, v0, a0);
            a1 = _mm256_fmadd_ps(q, v1, a1);
            a2 = _mm256_fmadd_ps(q, v2, a2);
            a3 = _mm256_fmadd_ps(q, v3, a3);
        } else {
            v0 = _mm256_sub_ps(q, v0);
            v1 = _mm256_sub_ps(q, v1);
            v2 = _mm256_sub_ps(q, v2);
            v3 = _mm256_sub_ps(q, v3);
            a0 = _mm256_fmadd_ps(v0, v0, a0);
            a1 = _mm256_fmadd_ps(v1, v1, a1);
            a2 = _mm256_fmadd_ps(v2, v2, a2);
            a3 = _mm256_fmadd_ps(v3, v3, a3);
        }
    }
    float s[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
    const float* ys[4] = {y0, y1, y2, y3};
    for (; i < d; i++) {
        for (int j = 0; j < 4; j++) {
            float t = Ip ? x[i] * ys[j][i] : (x[i] - ys[j][i]) * (x[i] - ys[j][i]);
            s[j] += t;
        }
    }
    for (int j = 0; j < 4; j++) {
        out[j] = s[j];
    }
}

#endif

bool has_avx2() {
#if defined(__x86_64__)
    static const bool yes =
            __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return yes;
#else
    return false;
#endif
}

Kernels kernels(bool ip) {
#if defined(__x86_64__)
    if (has_avx2()) {
        return ip ? Kernels{one_avx2<true>, four_avx2<true>}
                  : Kernels{one_avx2<false>, four_avx2<false>};
    }
#endif
    return ip ? Kernels{one_portable<true>, four_portable<true>}
              : Kernels{one_portable<false>, four_portable<false>};
}

// Distances to the vectors of a flat storage: squared L2, or inner products (negated when
// `negate`: HNSW searches for the smallest value, as FAISS's NegativeDistanceComputer does for
// IndexHNSW on an inner-product storage).
struct FlatDistance : faiss::FlatCodesDistanceComputer {
    const float* base;
    size_t d;
    bool negate;
    Kernels k;
    const float* q = nullptr;

    FlatDistance(const uint8_t* codes, size_t d, bool ip, bool negate)
            : faiss::FlatCodesDistanceComputer(codes, d * sizeof(float)),
              base(reinterpret_cast<const float*>(codes)),
              d(d),
              negate(negate),
              k(kernels(ip)) {}

    float sign(float v) const {
        return negate ? -v : v;
    }

    void set_query(const float* x) override {
        q = x;
    }

    float distance_to_code(const uint8_t* code) override {
        return sign(k.one(q, reinterpret_cast<const float*>(code), d));
    }

    float operator()(idx_t i) override {
        return sign(k.one(q, base + i * d, d));
    }

    void distances_batch_4(
            const idx_t i0,
            const idx_t i1,
            const idx_t i2,
            const idx_t i3,
            float& d0,
            float& d1,
            float& d2,
            float& d3) override {
        float out[4];
        k.four(q, base + i0 * d, base + i1 * d, base + i2 * d, base + i3 * d, d, out);
        d0 = sign(out[0]);
        d1 = sign(out[1]);
        d2 = sign(out[2]);
        d3 = sign(out[3]);
    }

    float symmetric_dis(idx_t i, idx_t j) override {
        return sign(k.one(base + i * d, base + j * d, d));
    }
};

// A flat storage (IndexFlat: serialised, cloned and read back as FAISS's own) whose distance
// computer is FlatDistance.
struct OwnKernelsFlat : faiss::IndexFlat {
    OwnKernelsFlat(idx_t d, faiss::MetricType metric) : faiss::IndexFlat(d, metric) {}

    faiss::FlatCodesDistanceComputer* get_FlatCodesDistanceComputer() const override {
        return new FlatDistance(
                codes.data(), size_t(d), metric_type == faiss::METRIC_INNER_PRODUCT, false);
    }
};

bool metric_is_ip(faiss::MetricType m, bool& ip) {
    if (m == faiss::METRIC_L2) {
        ip = false;
        return true;
    }
    if (m == faiss::METRIC_INNER_PRODUCT) {
        ip = true;
        return true;
    }
    return false;
}

// The arrays' owners in an IndexIDMap over a flat index of floats, or over an IndexHNSW whose
// storage is one: all null for any other index.
struct Parts {
    const faiss::IndexIDMap* map = nullptr;
    const faiss::IndexFlat* flat = nullptr;
    const faiss::IndexHNSW* hnsw = nullptr;
};

Parts parts_of(const void* index) {
    Parts p;
    auto* map = dynamic_cast<const faiss::IndexIDMap*>(static_cast<const faiss::Index*>(index));
    if (!map) {
        return p;
    }
    auto* hnsw = dynamic_cast<const faiss::IndexHNSW*>(map->index);
    auto* flat = dynamic_cast<const faiss::IndexFlat*>(hnsw ? hnsw->storage : map->index);
    if (!flat || flat->code_size != sizeof(float) * size_t(flat->d)) {
        return p;
    }
    p.map = map;
    p.flat = flat;
    p.hnsw = hnsw;
    return p;
}

// The IndexHNSW inside an IndexIDMap, and its flat float storage; null when `index` is not
// one.
const faiss::IndexHNSW* hnsw_of(const void* index, const faiss::IndexIDMap** map_out) {
    Parts p = parts_of(index);
    if (p.hnsw && map_out) {
        *map_out = p.map;
    }
    return p.hnsw;
}

// The calling thread's visited table, grown to the largest index it has searched. HNSW::search
// marks with a generation number and advances it at the end of each search.
thread_local std::unique_ptr<faiss::VisitedTable> visited;

faiss::VisitedTable& visited_table(size_t n) {
    if (!visited) {
        visited = std::make_unique<faiss::VisitedTable>(static_cast<int>(n));
    } else if (visited->visited.size() < n) {
        // New entries are 0, which no generation (1..249) equals: unvisited.
        visited->visited.resize(n, 0);
    }
    return *visited;
}

} // namespace

extern "C" {

// Searches one query `x` in `index` when it is an IndexIDMap over an IndexHNSWFlat (flat
// float storage, L2 or inner product), writing k distances and ids (-1 past the results).
// `sel` (may be null) is an IDSelector over the external ids. Returns 0 on success, 1 when the
// index is of another kind (nothing written: use Index::search), -1 on a FAISS error (see
// lookalike_hnsw_last_error).
int lookalike_hnsw_search(
        const void* index,
        const float* x,
        int64_t k,
        const void* sel,
        float* distances,
        int64_t* labels) {
    try {
        const faiss::IndexIDMap* map = nullptr;
        auto* hnsw = hnsw_of(index, &map);
        bool ip;
        if (!hnsw || !metric_is_ip(hnsw->metric_type, ip)) {
            return 1;
        }
        auto* flat = static_cast<const faiss::IndexFlat*>(hnsw->storage);
        if (k <= 0) {
            last_error = "k must be positive";
            return -1;
        }

        using RH = faiss::HeapBlockResultHandler<faiss::HNSW::C>;
        RH block(1, distances, labels, k);
        RH::SingleResultHandler res(block);
        FlatDistance dis(flat->codes.data(), size_t(flat->d), ip, ip);
        dis.set_query(x);

        faiss::IDSelectorTranslated translated(
                map->id_map, static_cast<const faiss::IDSelector*>(sel));
        faiss::SearchParametersHNSW params;
        params.efSearch = hnsw->hnsw.efSearch;
        params.check_relative_distance = hnsw->hnsw.check_relative_distance;
        params.bounded_queue = hnsw->hnsw.search_bounded_queue;
        params.sel = sel ? &translated : nullptr;

        faiss::VisitedTable& vt = visited_table(size_t(hnsw->ntotal));
        res.begin(0);
        try {
            hnsw->hnsw.search(dis, res, vt, &params);
        } catch (...) {
            // A search cut short leaves marks of the current generation behind.
            std::fill(vt.visited.begin(), vt.visited.end(), 0);
            vt.visno = 1;
            throw;
        }
        res.end();

        for (int64_t i = 0; i < k; i++) {
            if (ip) {
                distances[i] = -distances[i];
            }
            if (labels[i] >= 0) {
                labels[i] = map->id_map[labels[i]];
            }
        }
        return 0;
    } catch (const std::exception& e) {
        last_error = e.what();
        return -1;
    } catch (...) {
        last_error = "unknown C++ exception in the HNSW search";
        return -1;
    }
}

// Gives the HNSW storage of `index` (an IndexIDMap over an IndexHNSWFlat, L2 or inner
// product) lookalike's distance kernels, for FAISS's adds and searches: the storage becomes an
// OwnKernelsFlat holding the same vectors. Returns 0 when done (or done before), 1 when the
// index is of another kind (nothing changed), -1 on a FAISS error. Not while the index is in
// use by another thread.
int lookalike_hnsw_use_own_kernels(void* index) {
    try {
        auto* hnsw = const_cast<faiss::IndexHNSW*>(hnsw_of(index, nullptr));
        bool ip;
        if (!hnsw || !metric_is_ip(hnsw->metric_type, ip)) {
            return 1;
        }
        auto* old = static_cast<faiss::IndexFlat*>(hnsw->storage);
        if (dynamic_cast<OwnKernelsFlat*>(old)) {
            return 0;
        }
        auto* own = new OwnKernelsFlat(old->d, old->metric_type);
        own->codes = std::move(old->codes);
        own->ntotal = old->ntotal;
        own->is_trained = old->is_trained;
        own->verbose = old->verbose;
        if (hnsw->own_fields) {
            delete old;
        }
        hnsw->storage = own;
        hnsw->own_fields = true;
        return 0;
    } catch (const std::exception& e) {
        last_error = e.what();
        return -1;
    } catch (...) {
        last_error = "unknown C++ exception giving HNSW its distance kernels";
        return -1;
    }
}

} // extern "C"

namespace {

// A copy of a vector with room for `extra` more elements (at least double its capacity), when
// it has less room than that; empty otherwise.
// Reserves room for `n` elements in the empty `out` and asks the kernel to back it with 2 MB
// pages where it can (THP "madvise" mode, the usual default, gives them only when asked): the
// vectors and links are read at random by every search and add, and with 4 KB pages nearly
// each of those reads at a million vectors misses the TLB.
template <typename T>
void reserve_huge(std::vector<T>& out, size_t n) {
    out.reserve(n);
    constexpr uintptr_t huge = uintptr_t(2) << 20;
    auto start = reinterpret_cast<uintptr_t>(out.data());
    uintptr_t from = (start + huge - 1) / huge * huge;
    uintptr_t to = (start + n * sizeof(T)) / huge * huge;
    if (to > from) {
        (void)madvise(reinterpret_cast<void*>(from), to - from, MADV_HUGEPAGE);
    }
}

template <typename T>
bool grown(const std::vector<T>& v, size_t extra, std::vector<T>& out) {
    if (v.capacity() - v.size() >= extra) {
        return false;
    }
    reserve_huge(out, std::max(2 * v.capacity(), v.size() + extra));
    out.assign(v.begin(), v.end());
    return true;
}

// The same for an array FAISS may hold as a view into a mapped snapshot (mapped.cpp): a view
// has no room, so it is always copied.
template <typename T>
bool grown(const faiss::MaybeOwnedVector<T>& v, size_t extra, std::vector<T>& out) {
    if (v.is_owned) {
        return grown(v.owned_data, extra, out);
    }
    reserve_huge(out, v.size() + std::max(extra, v.size() / 4));
    out.assign(v.data(), v.data() + v.size());
    return true;
}

// Makes `v` own `data` (of its size), keeping what it held (a view's owner, or its old array)
// in `old` until that is freed.
template <typename T>
void take(faiss::MaybeOwnedVector<T>& v, std::vector<T>& data, std::shared_ptr<void>& old) {
    if (!v.is_owned) {
        old = std::move(v.owner);
        v.owner = nullptr;
        v.view_data = nullptr;
        v.view_size = 0;
        v.is_owned = true;
        v.owned_data.clear();
    }
    v.owned_data.swap(data);
    v.c_ptr = v.owned_data.data();
    v.c_size = v.owned_data.size();
}

// Bigger copies of the arrays that an index's adds grow, made by
// lookalike_hnsw_prepare_growth and swapped in by lookalike_hnsw_commit_growth. After the
// swap it holds the old arrays until it is freed.
struct Growth {
    size_t ntotal;
    std::vector<uint8_t> codes;
    std::vector<faiss::HNSW::storage_idx_t> neighbors;
    std::vector<size_t> offsets;
    std::vector<int> levels;
    std::vector<idx_t> ids;
    // The owners of views replaced by copies (mapped.cpp's regions), unmapped when freed.
    std::shared_ptr<void> old_codes, old_neighbors;
    bool has_codes = false, has_neighbors = false, has_offsets = false, has_levels = false,
         has_ids = false;
};

} // namespace

extern "C" {

// Copies the arrays of `index` (an IndexIDMap over a flat index or an IndexHNSWFlat) that
// adding `extra` vectors would make std::vector reallocate, into bigger ones: FAISS's own
// reallocation copies them inside an add (at a million vectors, 512 MB of vectors in a third
// of a second; at 8,000 vectors of an exact index's 2,408 dimensions, 77 MB). Only
// reads the index: the caller keeps writers out but may let searches run. Returns a Growth to
// pass to lookalike_hnsw_commit_growth (or to lookalike_hnsw_free_growth), or null when nothing
// needs to grow, the index is of another kind, or on an error.
void* lookalike_hnsw_prepare_growth(const void* index, int64_t extra) {
    try {
        Parts p = parts_of(index);
        if (!p.map || extra <= 0) {
            return nullptr;
        }
        size_t n = size_t(extra);
        auto g = std::make_unique<Growth>();
        g->ntotal = size_t(p.map->ntotal);
        g->has_codes = grown(p.flat->codes, n * p.flat->code_size, g->codes);
        g->has_ids = grown(p.map->id_map, n, g->ids);
        if (p.hnsw) {
            // Level 0's links, and a little more for the upper levels' (2 % of vectors).
            const auto& h = p.hnsw->hnsw;
            size_t links = size_t(h.nb_neighbors(0)) + size_t(h.nb_neighbors(1));
            g->has_neighbors = grown(h.neighbors, n * links, g->neighbors);
            g->has_offsets = grown(h.offsets, n, g->offsets);
            g->has_levels = grown(h.levels, n, g->levels);
        }
        if (!(g->has_codes || g->has_neighbors || g->has_offsets || g->has_levels || g->has_ids)) {
            return nullptr;
        }
        return g.release();
    } catch (...) {
        return nullptr;
    }
}

// Swaps a Growth's arrays into `index` (the caller holds it exclusively), if the index has
// not changed since lookalike_hnsw_prepare_growth; the Growth then holds the old arrays.
// Returns 0 when swapped, 1 when the index changed (nothing done).
int lookalike_hnsw_commit_growth(void* index, void* growth) {
    auto* g = static_cast<Growth*>(growth);
    Parts p = parts_of(index);
    if (!g || !p.map || size_t(p.map->ntotal) != g->ntotal) {
        return 1;
    }
    auto* map = const_cast<faiss::IndexIDMap*>(p.map);
    auto* flat = const_cast<faiss::IndexFlat*>(p.flat);
    auto* hnsw = const_cast<faiss::IndexHNSW*>(p.hnsw);
    bool graph_grown = g->has_neighbors || g->has_offsets || g->has_levels;
    // The same sizes as when copied (no add in between: the caller keeps writers out).
    if ((g->has_codes && g->codes.size() != flat->codes.size()) ||
        (g->has_ids && g->ids.size() != map->id_map.size()) || (graph_grown && !hnsw) ||
        (g->has_neighbors && g->neighbors.size() != hnsw->hnsw.neighbors.size()) ||
        (g->has_offsets && g->offsets.size() != hnsw->hnsw.offsets.size()) ||
        (g->has_levels && g->levels.size() != hnsw->hnsw.levels.size())) {
        return 1;
    }
    if (g->has_codes) {
        take(flat->codes, g->codes, g->old_codes);
    }
    if (g->has_ids) {
        map->id_map.swap(g->ids);
    }
    if (g->has_neighbors) {
        take(hnsw->hnsw.neighbors, g->neighbors, g->old_neighbors);
    }
    if (g->has_offsets) {
        hnsw->hnsw.offsets.swap(g->offsets);
    }
    if (g->has_levels) {
        hnsw->hnsw.levels.swap(g->levels);
    }
    return 0;
}

// Frees a Growth (and the arrays it holds).
void lookalike_hnsw_free_growth(void* growth) {
    delete static_cast<Growth*>(growth);
}

// Copies the arrays of `index` (an IndexIDMap over a flat or HNSW index) that are views into a
// mapped snapshot (mapped.cpp) into arrays of its own, which adds can grow. Returns 1 when
// something was copied, 0 when every array was already owned, -1 on an error.
int lookalike_hnsw_own_arrays(void* index) {
    try {
        Parts p = parts_of(index);
        auto* flat = const_cast<faiss::IndexFlat*>(p.flat);
        auto* hnsw = const_cast<faiss::IndexHNSW*>(p.hnsw);
        int copied = 0;
        std::shared_ptr<void> old;
        if (flat && !flat->codes.is_owned) {
            std::vector<uint8_t> codes(flat->codes.data(), flat->codes.data() + flat->codes.size());
            take(flat->codes, codes, old);
            copied = 1;
        }
        if (hnsw && !hnsw->hnsw.neighbors.is_owned) {
            auto& nb = hnsw->hnsw.neighbors;
            std::vector<faiss::HNSW::storage_idx_t> links(nb.data(), nb.data() + nb.size());
            take(nb, links, old);
            copied = 1;
        }
        return copied;
    } catch (const std::exception& e) {
        last_error = e.what();
        return -1;
    } catch (...) {
        last_error = "unknown C++ exception copying a mapped index";
        return -1;
    }
}

// Sets this thread's last error message (for mapped.cpp).
void lookalike_hnsw_set_error(const char* message) {
    last_error = message;
}

// The message of this thread's last failed call here (valid until its next call).
const char* lookalike_hnsw_last_error() {
    return last_error.c_str();
}

// Whether the AVX2 and FMA kernels are in use (for benchmarks and logs).
int lookalike_hnsw_simd() {
    return has_avx2() ? 1 : 0;
}

} // extern "C"
