// An HNSW snapshot read with its vectors mapped from their file instead of copied
// (src/index/snapshot.rs, src/index/ffi.rs).
//
// A snapshot keeps FAISS's serialisation of the index in two files: index.faiss holds all of it
// but the vectors (headers, the HNSW graph, the ids), and index.vectors the vectors, which belong
// at offset `at` of the stream. Read through FAISS's ordinary reader, every byte is copied into
// fresh memory: at a million 256-d vectors 1.3 GB, and most of a reopen (0.6 of 0.85 s).
//
// Here the stream is laid out in one range of addresses, as FAISS's ZeroCopyIOReader reads it:
// the parts before and after the vectors are read into anonymous memory, and index.vectors is
// mapped in between (privately, read-only), at a page boundary. FAISS then makes its two large
// arrays, the flat codes and the HNSW neighbours, views into that range; the rest it copies. A
// MappedRegion, set as the owner of both views, unmaps the range when the last view goes.
//
// Views cannot grow: before an add, hnsw.cpp's growth copies them into owned arrays
// (lookalike_hnsw_prepare_growth) or lookalike_hnsw_own_arrays does. Nothing writes to a view.

#include <faiss/Index.h>
#include <faiss/IndexFlat.h>
#include <faiss/IndexHNSW.h>
#include <faiss/IndexIDMap.h>
#include <faiss/impl/maybe_owned_vector.h>
#include <faiss/impl/zerocopy_io.h>
#include <faiss/index_io.h>

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>

// hnsw.cpp: the message lookalike_hnsw_last_error returns.
extern "C" void lookalike_hnsw_set_error(const char* message);

namespace {

// A range of addresses from mmap, unmapped when the last view into it goes.
struct MappedRegion : faiss::MaybeOwnedVectorOwner {
    void* addr;
    size_t len;
    MappedRegion(void* a, size_t l) : addr(a), len(l) {}
    ~MappedRegion() override {
        munmap(addr, len);
    }
};

std::runtime_error os_error(const char* what) {
    return std::runtime_error(std::string(what) + ": " + std::strerror(errno));
}

// Reads `len` bytes of `fd` at `offset` into `to`.
void read_exactly(int fd, uint8_t* to, size_t len, uint64_t offset) {
    while (len > 0) {
        ssize_t n = pread(fd, to, len, off_t(offset));
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            throw os_error("reading index.faiss");
        }
        if (n == 0) {
            throw std::runtime_error("index.faiss is shorter than its stamp says");
        }
        to += n;
        len -= size_t(n);
        offset += uint64_t(n);
    }
}

size_t round_up(size_t n, size_t to) {
    return (n + to - 1) / to * to;
}

// The size of the kernel's huge pages on x86-64 (and of the page cache's largest folios).
constexpr size_t HUGE = size_t(2) << 20;

template <typename T>
void adopt(faiss::MaybeOwnedVector<T>& v, const std::shared_ptr<MappedRegion>& region) {
    if (!v.is_owned) {
        v.owner = region;
    }
}

} // namespace

extern "C" {

// Reads the index whose stream is graph[..at] ++ vectors[..len] ++ graph[at..] (graph_fd holds
// graph_len bytes), mapping the vectors (see above). Every page of the vectors is mapped now
// (they are in the page cache) rather than on first use: the first queries would otherwise
// fault them in (p99 1.7 ms at a million, against 0.7). Returns the
// index (a faiss::Index*, the caller's to free), or null on an error (the message for
// lookalike_hnsw_last_error). The files may be closed once it returns.
void* lookalike_read_mapped(
        int graph_fd,
        uint64_t graph_len,
        int vectors_fd,
        uint64_t at,
        uint64_t len) {
    try {
        if (at > graph_len) {
            throw std::runtime_error("the vectors' place is past the end of index.faiss");
        }
        struct stat st;
        if (len > 0 && (fstat(vectors_fd, &st) != 0 || uint64_t(st.st_size) < len)) {
            throw std::runtime_error("index.vectors is shorter than its stamp says");
        }
        const size_t page = size_t(sysconf(_SC_PAGESIZE));
        const size_t total = size_t(graph_len + len);
        // The vectors start at a multiple of HUGE in the range (so at a page boundary): where
        // the page cache holds index.vectors in 2 MB folios, the kernel can map each with one
        // page-table entry, as it cannot at other offsets.
        const size_t span = round_up(total + HUGE, page);
        void* range = mmap(
                nullptr,
                span,
                PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                -1,
                0);
        if (range == MAP_FAILED) {
            throw os_error("reserving memory for the index");
        }
        auto region = std::make_shared<MappedRegion>(range, span);
        uint8_t* vectors = reinterpret_cast<uint8_t*>(
                round_up(reinterpret_cast<uintptr_t>(range) + size_t(at), HUGE));
        uint8_t* base = vectors - at;
        read_exactly(graph_fd, base, size_t(at), 0);
        const size_t mapped = round_up(size_t(len), page);
        if (len > 0) {
            // Writable only until the part after the vectors is in: it starts inside their last
            // page when `len` is not a whole number of pages (that page alone is then copied).
            if (mmap(vectors,
                     mapped,
                     PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_FIXED,
                     vectors_fd,
                     0) == MAP_FAILED) {
                throw os_error("mapping index.vectors");
            }
        }
        read_exactly(graph_fd, vectors + len, size_t(graph_len - at), at);
        if (len > 0) {
            if (mprotect(vectors, mapped, PROT_READ) != 0) {
                throw os_error("protecting the mapped vectors");
            }
            (void)madvise(vectors, mapped, MADV_HUGEPAGE);
            // Maps the pages readable without copying them (Linux 5.14+; where the kernel does
            // not know it, pages are mapped on first use instead).
            (void)madvise(vectors, mapped, 22 /* MADV_POPULATE_READ */);
        }
        faiss::ZeroCopyIOReader reader(base, total);
        std::unique_ptr<faiss::Index> index(faiss::read_index(&reader, 0));
        if (reader.rp_ != total) {
            throw std::runtime_error("bytes follow the index in its stream");
        }
        auto* map = dynamic_cast<faiss::IndexIDMap*>(index.get());
        if (!map) {
            throw std::runtime_error("the index is not an IndexIDMap");
        }
        // The two layouts snapshot.rs accepts, whose only arrays that can be views are these;
        // the region lives while they do.
        auto* hnsw = dynamic_cast<faiss::IndexHNSW*>(map->index);
        auto* flat = dynamic_cast<faiss::IndexFlat*>(hnsw ? hnsw->storage : map->index);
        if (!flat) {
            throw std::runtime_error("the index is neither IDMap,Flat nor IDMap,HNSW,Flat");
        }
        adopt(flat->codes, region);
        if (hnsw) {
            adopt(hnsw->hnsw.neighbors, region);
        }
        return index.release();
    } catch (const std::exception& e) {
        lookalike_hnsw_set_error(e.what());
        return nullptr;
    } catch (...) {
        lookalike_hnsw_set_error("unknown C++ exception reading the index");
        return nullptr;
    }
}

} // extern "C"
