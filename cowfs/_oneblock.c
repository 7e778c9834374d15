/*
 * cowfs._oneblock: the engine's hot paths in C, first of all the one-block
 * write in its common case.
 *
 * A random 4 KiB write is the request a VM disk sends most, and every step of
 * it in Python (checks, allocation, the data write, the tree edit, the two
 * reference counts, the journal record, the times) cost about 11 us of a
 * ~30 us request.  write_block() does the whole of it in one call when the
 * case is the common one: a writable volume whose tree path was already
 * changed since the last checkpoint (every node on it dirty, one reference),
 * a free data unit at the allocation cursor, room in the leaf, the journal
 * and the metadata reserve.  Any other case answers -1 before changing
 * anything, and Pool.write takes the general Python path, which stays the
 * definition of what a write does; tests/test_engine_oneblock.py runs both
 * on the same random operations and requires the same trees, counts, data
 * and journal records.
 *
 * The first write after a snapshot into a leaf the snapshot shares copies
 * the leaf and takes a reference on each of its ~157 data units; in Python
 * that was most of the copy's cost.  incref_blocks() does it for any leaf
 * whose counts stay below MAX_DIRECT and leaves the rest to Python.
 * decref_blocks() is the other way: the old pointers a write replaces
 * (256 for a 1 MiB overwrite, about a quarter of the CPU it cost in
 * process when done in Python), dropped in one call.
 *
 * A read of many blocks (a 1 MiB sequential read: 256) spent most of its
 * time in a Python loop per block.  raw_run() finds where a run of raw
 * blocks stored one after the other ends in a leaf, first_bad() checks a
 * run's checksums, and read_buffer() gives the read a buffer without
 * zeroing it first; Pool._read_blocks decides what to read with them.
 *
 * A random 4 KiB read took 3.4 us of Pool.read with the page cache warm, of
 * which 1.1 us was the pread: read_block() does the tree walk through the
 * nodes in memory and the checksum in one call, and leaves the data read
 * itself to Pool._pread_data (the wait rules and the pool's errors).
 *
 * Every checksum here is xxh3 by xxHash's C function, which the xxhash
 * package's extension carries (find_native_xxh3), or by a call of its
 * Python function where that is not found.
 *
 * The rules followed are the tree's (cowfs/btree.py), the reference table's
 * (cowfs/spacemap.py), the journal's (cowfs/journal.py) and the pool's
 * (cowfs/pool.py); their constants are read from those modules, and the
 * module refuses to load if the journal's record layout is not the one
 * written here.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Read from cowfs.format, cowfs.spacemap and cowfs.journal at import. */
static long long LEAF_CAP, MAX_DIRECT, PENDING, PAGE_SHIFT;
static long long BLOCK, SECTORS_PER_BLOCK;
static long long JOURNAL_MAGIC, R_WRITE, HDR_SIZE, WRITE_ONE_SIZE;

/* cowfs.pool's, read at the first write_block() call: cowfs.pool imports
 * this module (through cowfs.btree), so it cannot be imported from here at
 * import time. */
static long long MAX_VOLUME_SIZE, META_RESERVE_UNITS, JOURNAL_BUFFER_LIMIT;
static long long DIRTY_NODE_LIMIT, WRITEBACK_BYTES;
static int pool_constants_loaded;

/* The journal record layout write_block() packs by hand. */
#define HDR_FORMAT "<IQQHHIQ"
#define WRITE_ONE_FORMAT "<QQIQQQH"
#define RECORD_MAX 128

static PyObject *xxh3;          /* xxhash.xxh3_64_intdigest, cowfs.format.checksum's */

/* The same function in C, XXH3_64bits_dispatch of the xxhash package's own
 * extension (xxHash's public API: it picks SSE2, AVX2 or AVX-512 at run
 * time).  Called per block it costs 37 ns on 4 KiB against 87 ns for the call
 * of xxh3 above, whose checksums of 1 MiB took 28 us in 4 KiB blocks and take
 * 10 us this way.  NULL when not found or not in agreement with xxh3 (see
 * find_native_xxh3), and then xxh3 is called. */
typedef uint64_t (*xxh3_fn)(const void *, size_t);
static xxh3_fn xxh3_found, xxh3_native;
static PyObject *PoolError;     /* cowfs.errors.PoolError */
static unsigned char *zero_block;

static PyObject *s_leaf, *s_keys, *s_addrs, *s_csums, *s_slens, *s_children;
static PyObject *s_closed, *s_readonly, *s_stale, *s_degraded, *s_replaying, *s_datasets;
static PyObject *s_owner, *s_root, *s_size, *s_mapped, *s_mtime, *s_ctime;
static PyObject *s_store, *s_dirty, *s_drc, *s_mrc, *s_rc, *s_pending, *s_dirty_pages;
static PyObject *s_free, *s_cursor, *s_journal, *s_buf, *s_pos, *s_gen, *s_seq;
static PyObject *s_data, *s_pwrite, *s_unflushed, *s_data_dirty, *s_first_unsynced;
static PyObject *s_times_dirty, *s_lose_memory, *s_label;
static PyObject *s_cache, *s_move_to_end, *s_pread_data, *s_bad_block;

/* Tree depth can never come near this; it only bounds a corrupt cycle. */
#define MAX_DEPTH 64

/* A writable view of array.array arr with the given item size, or -1. */
static int
get_array(PyObject *arr, Py_ssize_t itemsize, Py_buffer *view, const char *what)
{
    if (PyObject_GetBuffer(arr, view, PyBUF_WRITABLE | PyBUF_FORMAT) < 0)
        return -1;
    if (view->itemsize != itemsize || view->ndim != 1) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_TypeError, "%s: unexpected item size", what);
        return -1;
    }
    return 0;
}

/* get_array() of the array attribute name of node. */
static int
get_items(PyObject *node, PyObject *name, Py_ssize_t itemsize, Py_buffer *view)
{
    PyObject *arr = PyObject_GetAttr(node, name);
    if (arr == NULL)
        return -1;
    int r = get_array(arr, itemsize, view, PyUnicode_AsUTF8(name));
    Py_DECREF(arr);
    return r;
}

/* get_array() of arrs[0..n-1] (item sizes sizes[], named what[] in
 * errors); on failure the views already taken are released. */
static int
get_arrays(int n, PyObject *const *arrs, const Py_ssize_t *sizes, const char *const *what,
           Py_buffer *views)
{
    for (int i = 0; i < n; i++) {
        if (get_array(arrs[i], sizes[i], &views[i], what[i]) < 0) {
            while (i-- > 0)
                PyBuffer_Release(&views[i]);
            return -1;
        }
    }
    return 0;
}

/* get_items() of node's array attributes names[0..n-1]; as get_arrays(). */
static int
get_node_arrays(PyObject *node, int n, PyObject *const *names, const Py_ssize_t *sizes,
                Py_buffer *views)
{
    for (int i = 0; i < n; i++) {
        if (get_items(node, names[i], sizes[i], &views[i]) < 0) {
            while (i-- > 0)
                PyBuffer_Release(&views[i]);
            return -1;
        }
    }
    return 0;
}

/* First index with keys[i] >= key. */
static Py_ssize_t
lower_bound(const uint64_t *keys, Py_ssize_t n, uint64_t key)
{
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (keys[mid] < key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* First index with keys[i] > key. */
static Py_ssize_t
upper_bound(const uint64_t *keys, Py_ssize_t n, uint64_t key)
{
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (keys[mid] <= key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* The dirty node at meta unit addr if the tree may change it in place
 * (dirty, exactly one reference), else NULL without an error set.
 * Returns a borrowed reference. */
static PyObject *
writable_node(PyObject *dirty, const unsigned char *mrc, Py_ssize_t mrc_len, uint64_t addr)
{
    if (addr == 0 || addr >= (uint64_t)mrc_len || mrc[addr] != 1)
        return NULL;
    PyObject *k = PyLong_FromUnsignedLongLong(addr);
    if (k == NULL)
        return NULL;
    PyObject *node = PyDict_GetItemWithError(dirty, k);
    Py_DECREF(k);
    return node;
}

/* Insert value at index j of the array attribute name of node. */
static int
insert_item(PyObject *node, PyObject *name, Py_ssize_t j, unsigned long long value)
{
    PyObject *arr = PyObject_GetAttr(node, name);
    if (arr == NULL)
        return -1;
    PyObject *r = PyObject_CallMethod(arr, "insert", "nK", j, value);
    Py_DECREF(arr);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static int
add_page(PyObject *pages, uint64_t unit)
{
    PyObject *p = PyLong_FromUnsignedLongLong(unit >> PAGE_SHIFT);
    if (p == NULL)
        return -1;
    int r = PySet_Add(pages, p);
    Py_DECREF(p);
    return r;
}

/* The child of internal node `node` that Tree.find_leaf (and Tree._replace)
 * descend into for key: keys[0] is the node's lower bound, so the index is
 * clamped at 0.  1 with *addr set, 0 when the node has no such child, -1
 * with an error set. */
static int
child_of(PyObject *node, uint64_t key, uint64_t *addr)
{
    Py_buffer v[2];
    if (get_node_arrays(node, 2, (PyObject *[]){s_keys, s_children}, (Py_ssize_t[]){8, 8}, v) < 0)
        return -1;
    Py_buffer kv = v[0], cv = v[1];
    Py_ssize_t i = upper_bound(kv.buf, kv.len / 8, key) - 1;
    if (i < 0)
        i = 0;
    int ok = i < cv.len / 8;
    if (ok)
        *addr = ((uint64_t *)cv.buf)[i];
    PyBuffer_Release(&kv);
    PyBuffer_Release(&cv);
    return ok;
}

/* The leaf the walk from addr down to key reaches, if every node on the way
 * may change in place; a new reference, or NULL (with an error set only on
 * failure). */
static PyObject *
writable_leaf(PyObject *dirty, const unsigned char *mrc, Py_ssize_t mrc_len, uint64_t addr,
              uint64_t key)
{
    for (int depth = 0; depth < MAX_DEPTH; depth++) {
        PyObject *node = writable_node(dirty, mrc, mrc_len, addr);
        if (node == NULL)
            return NULL;
        /* Held while attributes are read: nothing below runs Python code
         * that could drop it from the dict, but a borrowed reference would
         * rely on that. */
        Py_INCREF(node);
        PyObject *leaf = PyObject_GetAttr(node, s_leaf);
        int is_leaf = leaf == NULL ? -1 : PyObject_IsTrue(leaf);
        Py_XDECREF(leaf);
        if (is_leaf != 0) {
            if (is_leaf < 0)
                Py_CLEAR(node);
            return node;
        }
        int ok = child_of(node, key, &addr);
        Py_DECREF(node);
        if (ok <= 0)
            return NULL;
    }
    return NULL;
}

/* Where key goes in a leaf that may change in place, and what it replaces.
 * Fills *j (the index), *found (key is there) and *old_unit (its raw unit,
 * when found); returns 1 when the edit may happen here, 0 for the cases left
 * to the general path (a full leaf; an old pointer that is compressed, spans
 * units or whose count is not kept in its byte), -1 on failure. */
static int
leaf_slot(PyObject *node, uint64_t key, const unsigned char *drc, Py_ssize_t drc_len,
          Py_ssize_t *j, int *found, uint64_t *old_unit)
{
    Py_buffer kv, av, sv;
    if (get_items(node, s_keys, 8, &kv) < 0)
        return -1;
    Py_ssize_t n = kv.len / 8;
    *j = lower_bound(kv.buf, n, key);
    *found = *j < n && ((uint64_t *)kv.buf)[*j] == key;
    PyBuffer_Release(&kv);
    if (!*found)
        return n < LEAF_CAP;
    if (get_items(node, s_addrs, 8, &av) < 0)
        return -1;
    if (get_items(node, s_slens, 2, &sv) < 0) {
        PyBuffer_Release(&av);
        return -1;
    }
    int ok = *j < av.len / 8 && *j < sv.len / 2;
    if (ok) {
        uint64_t old_sector = ((uint64_t *)av.buf)[*j];
        uint16_t old_slen = ((uint16_t *)sv.buf)[*j];
        *old_unit = old_sector / SECTORS_PER_BLOCK;
        ok = old_slen == BLOCK && old_sector % SECTORS_PER_BLOCK == 0
             && *old_unit < (uint64_t)drc_len && drc[*old_unit] >= 1
             && drc[*old_unit] <= MAX_DIRECT;
    }
    PyBuffer_Release(&av);
    PyBuffer_Release(&sv);
    return ok;
}

/* The additions an edit makes that may fail (memory) but are harmless on
 * their own: both units' pages marked dirty (a page marked for nothing only
 * costs a rewrite), and the old unit in the pending list when its count is
 * about to reach 0 (release_pending skips a unit no longer PENDING). */
static int
edit_prepare(int found, uint64_t new_unit, uint64_t old_unit, const unsigned char *drc,
             PyObject *pending, PyObject *pages)
{
    if (add_page(pages, new_unit) < 0)
        return -1;
    if (!found)
        return 0;
    if (add_page(pages, old_unit) < 0)
        return -1;
    if (drc[old_unit] == 1) {
        PyObject *u = PyLong_FromUnsignedLongLong(old_unit);
        int r = u == NULL ? -1 : PyList_Append(pending, u);
        Py_XDECREF(u);
        return r;
    }
    return 0;
}

/* The edit itself, after leaf_slot() said yes and edit_prepare() succeeded:
 * the new unit gets its first reference, the old one (if any) loses one,
 * and the leaf entry is set or inserted.  Only an insert can fail (memory),
 * possibly half way; returns -1 then. */
static int
edit_apply(PyObject *node, Py_ssize_t j, int found, uint64_t key, uint64_t sector,
           uint64_t csum, uint64_t old_unit, unsigned char *drc)
{
    uint64_t new_unit = sector / SECTORS_PER_BLOCK;
    if (!found) {
        if (insert_item(node, s_keys, j, key) < 0
                || insert_item(node, s_addrs, j, sector) < 0
                || insert_item(node, s_csums, j, csum) < 0
                || insert_item(node, s_slens, j, (unsigned long long)BLOCK) < 0)
            return -1;
        drc[new_unit] = 1;
        return 0;
    }
    Py_buffer av, csv, sv;
    if (get_items(node, s_addrs, 8, &av) < 0)
        return -1;
    if (get_items(node, s_csums, 8, &csv) < 0) {
        PyBuffer_Release(&av);
        return -1;
    }
    if (get_items(node, s_slens, 2, &sv) < 0) {
        PyBuffer_Release(&av);
        PyBuffer_Release(&csv);
        return -1;
    }
    unsigned char old_count = drc[old_unit];
    drc[old_unit] = old_count == 1 ? (unsigned char)PENDING : old_count - 1;
    drc[new_unit] = 1;
    ((uint64_t *)av.buf)[j] = sector;
    ((uint64_t *)csv.buf)[j] = csum;
    ((uint16_t *)sv.buf)[j] = (uint16_t)BLOCK;
    PyBuffer_Release(&av);
    PyBuffer_Release(&csv);
    PyBuffer_Release(&sv);
    return 0;
}

/* Little-endian stores of the journal record's fields. */
static unsigned char *
put_le(unsigned char *p, uint64_t v, int nbytes)
{
    for (int i = 0; i < nbytes; i++)
        p[i] = (unsigned char)(v >> (8 * i));
    return p + nbytes;
}

/* An attribute that must be an int, as a C value; -1 on failure. */
static int
get_ll(PyObject *obj, PyObject *name, long long *out)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* Set an attribute to a new int; -1 on failure. */
static int
set_ll(PyObject *obj, PyObject *name, long long value)
{
    PyObject *v = PyLong_FromLongLong(value);
    if (v == NULL)
        return -1;
    int r = PyObject_SetAttr(obj, name, v);
    Py_DECREF(v);
    return r;
}

/* 1 if the attribute is true (is_none: is not None), 0 if not, -1 on failure. */
static int
attr_set(PyObject *obj, PyObject *name, int is_none)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    int r = is_none ? v != Py_None : PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

/* module.name, a new reference, or NULL with an error set. */
static PyObject *
module_attr(const char *module, const char *name)
{
    PyObject *m = PyImport_ImportModule(module);
    if (m == NULL)
        return NULL;
    PyObject *v = PyObject_GetAttrString(m, name);
    Py_DECREF(m);
    return v;
}

/* An int constant of a module; -1 on failure. */
static int
load_constant(const char *module, const char *name, long long *out)
{
    PyObject *v = module_attr(module, name);
    if (v == NULL)
        return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int
load_pool_constants(void)
{
    if (load_constant("cowfs.pool", "MAX_VOLUME_SIZE", &MAX_VOLUME_SIZE) < 0
            || load_constant("cowfs.pool", "META_RESERVE_UNITS", &META_RESERVE_UNITS) < 0
            || load_constant("cowfs.pool", "JOURNAL_BUFFER_LIMIT", &JOURNAL_BUFFER_LIMIT) < 0
            || load_constant("cowfs.pool", "DIRTY_NODE_LIMIT", &DIRTY_NODE_LIMIT) < 0
            || load_constant("cowfs.pool", "WRITEBACK_BYTES", &WRITEBACK_BYTES) < 0)
        return -1;
    pool_constants_loaded = 1;
    return 0;
}

/* The format's checksum (xxh3, 64 bits) of n bytes at p; -1 on failure. */
static int
raw_checksum(const void *p, size_t n, uint64_t *out)
{
    if (xxh3_native != NULL) {
        *out = xxh3_native(p, n);
        return 0;
    }
    PyObject *part = PyMemoryView_FromMemory((char *)p, n, PyBUF_READ);
    PyObject *v = part == NULL ? NULL : PyObject_CallOneArg(xxh3, part);
    Py_XDECREF(part);
    if (v == NULL)
        return -1;
    *out = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    return (*out == (uint64_t)-1 && PyErr_Occurred()) ? -1 : 0;
}

/* raw_checksum() of a bytes-like object; -1 on failure. */
static int
checksum_of(PyObject *buf, uint64_t *out)
{
    Py_buffer b;
    if (PyObject_GetBuffer(buf, &b, PyBUF_SIMPLE) < 0)
        return -1;
    int r = raw_checksum(b.buf, b.len, out);
    PyBuffer_Release(&b);
    return r;
}

/* XXH3_64bits_dispatch of the xxhash package's extension module (loaded by
 * the import of xxhash), if it is there and gives xxh3's answers for lengths
 * of every class XXH3 treats apart, from an aligned and an unaligned start;
 * else NULL.  Failing here only means the slower path, so errors are
 * cleared. */
static xxh3_fn
find_native_xxh3(void)
{
    static const size_t lengths[] = {0, 1, 3, 4, 8, 9, 16, 17, 128, 129, 240, 241,
                                     1023, 1024, 1025, 4096, 12288};
    static unsigned char sample[12288 + 1];
    PyObject *path = module_attr("xxhash._xxhash", "__file__");
    const char *cpath = path == NULL ? NULL : PyUnicode_AsUTF8(path);
    void *lib = cpath == NULL ? NULL : dlopen(cpath, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
    xxh3_fn f = lib == NULL ? NULL : (xxh3_fn)dlsym(lib, "XXH3_64bits_dispatch");
    Py_XDECREF(path);
    PyErr_Clear();
    for (size_t i = 0; i < sizeof sample; i++)
        sample[i] = (unsigned char)((i * 2654435761u) >> 13);
    xxh3_native = NULL;     /* raw_checksum() below: the Python function */
    for (size_t k = 0; f != NULL && k < sizeof lengths / sizeof lengths[0]; k++)
        for (size_t start = 0; f != NULL && start < 2; start++) {
            uint64_t want;
            if (raw_checksum(sample + start, lengths[k], &want) < 0) {
                PyErr_Clear();
                f = NULL;
            } else if (f(sample + start, lengths[k]) != want)
                f = NULL;
        }
    return f;
}

PyDoc_STRVAR(native_checksums_doc,
"native_checksums(on) -> bool\n\n"
"Whether this module's checksums are taken in C, by the xxhash package's own\n"
"XXH3_64bits_dispatch, instead of one call of xxhash.xxh3_64_intdigest per\n"
"block (same values, about a third of the time).  on=False makes them go\n"
"through the Python function (for tests of that path); on=True takes the C\n"
"function again if it was found at import.  Returns whether it is in use.");

static PyObject *
native_checksums(PyObject *self, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    xxh3_native = on ? xxh3_found : NULL;
    return PyBool_FromLong(xxh3_native != NULL);
}

/* A read-only view of blocks ``data`` and a writable one of the array('Q')
 * of checksums ``sums``; -1 (nothing held) on failure. */
static int
get_blocks_and_sums(PyObject *data, PyObject *sums, Py_buffer *bv, Py_buffer *cv)
{
    if (PyObject_GetBuffer(data, bv, PyBUF_SIMPLE) < 0)
        return -1;
    if (get_array(sums, 8, cv, "checksums") < 0) {
        PyBuffer_Release(bv);
        return -1;
    }
    return 0;
}

/* Whether a function of this module got other than ``want`` arguments;
 * if so a TypeError naming it is set. */
static int
wrong_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t want)
{
    if (nargs == want)
        return 0;
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments", name, want);
    return 1;
}

/* What the general path's Pool._Mutation does when a change fails half way:
 * the pool reloads its durable state before the next request, and the
 * caller sees EIO.  Called with the failure's exception set; returns NULL
 * with a PoolError set. */
static PyObject *
lose_memory(PyObject *pool)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    PyObject *r = PyObject_CallMethodOneArg(pool, s_lose_memory, value);
    Py_XDECREF(r);
    PyErr_Clear();
    PyObject *label = PyObject_GetAttr(pool, s_label);
    PyObject *msg = label == NULL ? NULL
        : PyUnicode_FromFormat("pool %S: internal error: %S", label, value);
    PyObject *err = msg == NULL ? NULL : PyObject_CallFunction(PoolError, "iO", EIO, msg);
    Py_XDECREF(label);
    Py_XDECREF(msg);
    if (err != NULL) {
        PyException_SetCause(err, value);   /* steals value */
        value = NULL;
        PyErr_SetObject(PoolError, err);
        Py_DECREF(err);
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return NULL;
}

/* The objects one write_block() call works on; all released at the end. */
struct wb {
    PyObject *v, *store, *dirty, *drc, *mrc, *drc_rc, *mrc_rc, *pending, *drc_pages;
    PyObject *mrc_pages, *journal, *jbuf, *file, *leaf, *now;
};

static void
wb_clear(struct wb *w)
{
    PyObject **p = (PyObject **)w;
    for (size_t i = 0; i < sizeof *w / sizeof(PyObject *); i++)
        Py_CLEAR(p[i]);
}

#define NOT_MINE (-1)
/* Everything was in place but a node on the tree path that is shared or that
 * the last checkpoint points at: Pool.write makes the path the volume's own
 * (Tree.own_path) and calls again.  After a snapshot that was every tenth
 * write at 64 KiB strides, through the general path. */
#define OWN_PATH_FIRST (-3)

/* The body of write_block(): the flags (>= 0), NOT_MINE, or -2 on failure
 * (an exception set; nothing in memory changed unless it is the PoolError of
 * lose_memory()). */
static long
write_block_impl(PyObject *pool, PyObject *vol_id, long long offset, PyObject *data,
                 const unsigned char *bytes, struct wb *w)
{
    int r;
    /* The pool serves writes (Pool._vol's attribute tests). */
    if ((r = attr_set(pool, s_closed, 0)) != 0 || (r = attr_set(pool, s_readonly, 0)) != 0
            || (r = attr_set(pool, s_replaying, 0)) != 0
            || (r = attr_set(pool, s_stale, 1)) != 0 || (r = attr_set(pool, s_degraded, 1)) != 0)
        return r < 0 ? -2 : NOT_MINE;
    PyObject *datasets = PyObject_GetAttr(pool, s_datasets);
    if (datasets == NULL)
        return -2;
    w->v = PyDict_Check(datasets) ? PyDict_GetItemWithError(datasets, vol_id) : NULL;
    Py_XINCREF(w->v);
    Py_DECREF(datasets);
    if (w->v == NULL)
        return PyErr_Occurred() ? -2 : NOT_MINE;
    if ((r = attr_set(w->v, s_owner, 1)) != 0)     /* a snapshot */
        return r < 0 ? -2 : NOT_MINE;
    /* A block of zeros is a hole: the general path's. */
    if (bytes[0] == 0 && memcmp(bytes, zero_block, BLOCK) == 0)
        return NOT_MINE;

    if (!(w->store = PyObject_GetAttr(pool, s_store)) || !(w->dirty = PyObject_GetAttr(w->store, s_dirty))
            || !(w->drc = PyObject_GetAttr(pool, s_drc)) || !(w->mrc = PyObject_GetAttr(pool, s_mrc))
            || !(w->drc_rc = PyObject_GetAttr(w->drc, s_rc))
            || !(w->mrc_rc = PyObject_GetAttr(w->mrc, s_rc))
            || !(w->pending = PyObject_GetAttr(w->drc, s_pending))
            || !(w->drc_pages = PyObject_GetAttr(w->drc, s_dirty_pages))
            || !(w->mrc_pages = PyObject_GetAttr(w->mrc, s_dirty_pages))
            || !(w->journal = PyObject_GetAttr(pool, s_journal))
            || !(w->jbuf = PyObject_GetAttr(w->journal, s_buf)))
        return -2;
    if (!PyDict_Check(w->dirty) || !PyByteArray_Check(w->drc_rc) || !PyByteArray_Check(w->mrc_rc)
            || !PyList_Check(w->pending) || !PySet_Check(w->drc_pages)
            || !PySet_Check(w->mrc_pages) || !PyByteArray_Check(w->jbuf)) {
        PyErr_SetString(PyExc_TypeError, "write_block: unexpected pool structures");
        return -2;
    }

    /* Pool._ensure_meta_reserve: short of reserve, the general path grows it. */
    long long mrc_free, pos, jsize, gen, seq, cursor, vsize, mapped, root, unflushed;
    if (get_ll(w->mrc, s_free, &mrc_free) < 0)
        return -2;
    long long need = META_RESERVE_UNITS + PySet_GET_SIZE(w->drc_pages)
                     + PySet_GET_SIZE(w->mrc_pages) + PyDict_GET_SIZE(w->dirty) / 64;
    if (mrc_free < need)
        return NOT_MINE;
    /* Journal.fits: when the record does not fit, the general path checkpoints. */
    Py_ssize_t jlen = PyByteArray_GET_SIZE(w->jbuf);
    if (get_ll(w->journal, s_pos, &pos) < 0 || get_ll(w->journal, s_size, &jsize) < 0)
        return -2;
    if (pos + jlen + 2 * HDR_SIZE + WRITE_ONE_SIZE + BLOCK > jsize)
        return NOT_MINE;

    /* The tree path may change in place and the leaf takes the entry. */
    if (get_ll(w->v, s_root, &root) < 0)
        return -2;
    uint64_t key = (uint64_t)offset / BLOCK;
    w->leaf = writable_leaf(w->dirty, (const unsigned char *)PyByteArray_AS_STRING(w->mrc_rc),
                            PyByteArray_GET_SIZE(w->mrc_rc), (uint64_t)root, key);
    if (w->leaf == NULL)
        return PyErr_Occurred() ? -2 : root != 0 ? OWN_PATH_FIRST : NOT_MINE;
    Py_ssize_t j;
    int found;
    uint64_t old_unit = 0;
    const unsigned char *drc = (const unsigned char *)PyByteArray_AS_STRING(w->drc_rc);
    Py_ssize_t drc_len = PyByteArray_GET_SIZE(w->drc_rc);
    if ((r = leaf_slot(w->leaf, key, drc, drc_len, &j, &found, &old_unit)) <= 0)
        return r < 0 ? -2 : NOT_MINE;

    /* RefTable.find_free(1): next fit from the cursor.  Nothing is marked
     * until the write is mapped: no other code runs on the pool meanwhile. */
    if (get_ll(w->drc, s_cursor, &cursor) < 0)
        return -2;
    const unsigned char *hit = NULL;
    if (cursor >= 0 && cursor < drc_len)
        hit = memchr(drc + cursor, 0, drc_len - cursor);
    if (hit == NULL && cursor > 0)
        hit = memchr(drc, 0, drc_len);
    if (hit == NULL)
        return NOT_MINE;    /* the general path syncs or grows the pool */
    uint64_t unit = hit - drc;
    uint64_t sector = unit * SECTORS_PER_BLOCK;

    uint64_t csum;
    if (checksum_of(data, &csum) < 0)
        return -2;

    /* The data, through the pool file's own interface (tests put crash and
     * fault simulators there).  Its failure changes nothing. */
    if (!(w->file = PyObject_GetAttr(pool, s_data)))
        return -2;
    PyObject *off = PyLong_FromUnsignedLongLong(unit * BLOCK);
    if (off == NULL)
        return -2;
    PyObject *res = PyObject_CallMethodObjArgs(w->file, s_pwrite, data, off, NULL);
    Py_DECREF(off);
    if (res == NULL)
        return -2;
    Py_DECREF(res);

    /* Checked again after the data write, which ran Python code (the pool
     * file's): it changes nothing in memory, but if it ever did, the refusal
     * would leave the data in a unit that stays free, harmless. */
    drc = (const unsigned char *)PyByteArray_AS_STRING(w->drc_rc);
    drc_len = PyByteArray_GET_SIZE(w->drc_rc);
    if (unit >= (uint64_t)drc_len || drc[unit] != 0
            || (r = leaf_slot(w->leaf, key, drc, drc_len, &j, &found, &old_unit)) <= 0)
        return r < 0 ? -2 : NOT_MINE;

    /* Everything that may fail before the change: the record (Journal.append),
     * the journal buffer's room for it, the values to store. */
    if (get_ll(w->journal, s_gen, &gen) < 0 || get_ll(w->journal, s_seq, &seq) < 0
            || get_ll(w->v, s_size, &vsize) < 0 || get_ll(w->v, s_mapped, &mapped) < 0
            || get_ll(pool, s_unflushed, &unflushed) < 0)
        return -2;
    long long new_size = vsize > offset + BLOCK ? vsize : offset + BLOCK;
    unsigned char rec[RECORD_MAX];
    unsigned char *p = rec;
    p = put_le(p, JOURNAL_MAGIC, 4);
    p = put_le(p, gen, 8);
    p = put_le(p, seq, 8);
    p = put_le(p, R_WRITE, 2);
    p = put_le(p, 0, 2);
    p = put_le(p, WRITE_ONE_SIZE, 4);
    unsigned char *rec_csum = p;
    p = put_le(p, 0, 8);
    PyObject *vid_long = PyNumber_Index(vol_id);
    if (vid_long == NULL)
        return -2;
    uint64_t vid = PyLong_AsUnsignedLongLong(vid_long);
    Py_DECREF(vid_long);
    if (vid == (uint64_t)-1 && PyErr_Occurred())
        return -2;
    p = put_le(p, vid, 8);
    p = put_le(p, key, 8);
    p = put_le(p, 1, 4);
    p = put_le(p, new_size, 8);
    p = put_le(p, sector, 8);
    p = put_le(p, csum, 8);
    p = put_le(p, BLOCK, 2);
    uint64_t record_csum;
    if (raw_checksum(rec, p - rec, &record_csum) < 0)
        return -2;
    put_le(rec_csum, record_csum, 8);

    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (!(w->now = PyLong_FromLongLong((long long)ts.tv_sec * 1000000000LL + ts.tv_nsec)))
        return -2;
    /* Pool._data_changed: the new times are journaled at the next sync.  An
     * entry made for a write that then fails only journals the times again. */
    PyObject *times_dirty = PyObject_GetAttr(pool, s_times_dirty);
    r = times_dirty == NULL || !PyDict_Check(times_dirty)
        || PyDict_SetItem(times_dirty, vol_id, w->v) < 0;
    Py_XDECREF(times_dirty);
    if (r) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "write_block: times_dirty is not a dict");
        return -2;
    }
    if (edit_prepare(found, unit, old_unit, drc, w->pending, w->drc_pages) < 0)
        return -2;
    if (PyByteArray_Resize(w->jbuf, jlen + (p - rec)) < 0)
        return -2;

    /* The change.  Only an insert into the leaf can fail from here on. */
    unsigned char *drc_w = (unsigned char *)PyByteArray_AS_STRING(w->drc_rc);
    if (edit_apply(w->leaf, j, found, key, sector, csum, old_unit, drc_w) < 0) {
        PyByteArray_Resize(w->jbuf, jlen);
        lose_memory(pool);
        return -2;
    }
    memcpy(PyByteArray_AS_STRING(w->jbuf) + jlen, rec, p - rec);
    long long drc_free;
    long flags = 0;
    /* Attribute stores of ints into existing slots and dict keys. */
    r = get_ll(w->drc, s_free, &drc_free) < 0
        || set_ll(w->drc, s_free, drc_free - 1) < 0
        || set_ll(w->drc, s_cursor, unit + 1) < 0
        || set_ll(w->journal, s_seq, seq + 1) < 0
        || (!found && set_ll(w->v, s_mapped, mapped + 1) < 0)
        || (new_size != vsize && set_ll(w->v, s_size, new_size) < 0)
        || PyObject_SetAttr(w->v, s_mtime, w->now) < 0
        || PyObject_SetAttr(w->v, s_ctime, w->now) < 0
        || PyObject_SetAttr(pool, s_data_dirty, Py_True) < 0;
    if (!r && jlen == 0) {
        /* Pool._log: when the oldest unsynced change was made. */
        clock_gettime(CLOCK_MONOTONIC, &ts);
        PyObject *mono = PyFloat_FromDouble((double)ts.tv_sec + ts.tv_nsec * 1e-9);
        r = mono == NULL || PyObject_SetAttr(pool, s_first_unsynced, mono) < 0;
        Py_XDECREF(mono);
    }
    if (!r) {
        /* Pool._data_written: a writeback hint every WRITEBACK_BYTES. */
        unflushed += BLOCK;
        if (unflushed >= WRITEBACK_BYTES) {
            unflushed = 0;
            flags |= 2;
        }
        r = set_ll(pool, s_unflushed, unflushed) < 0;
    }
    if (r) {
        lose_memory(pool);
        return -2;
    }
    /* Pool._after_change: a commit or checkpoint is due. */
    if (PyByteArray_GET_SIZE(w->jbuf) > JOURNAL_BUFFER_LIMIT
            || PyDict_GET_SIZE(w->dirty) > DIRTY_NODE_LIMIT)
        flags |= 1;
    return flags;
}

PyDoc_STRVAR(write_block_doc,
"write_block(pool, vol_id, offset, data) -> int\n\n"
"Pool.write of one whole, non-zero block at a block-aligned ``offset`` of\n"
"volume ``vol_id``, done in one call when it is the common case (see the\n"
"module comment): the data is written to a free unit through ``pool.data``,\n"
"mapped in place, counted, journaled (one R_WRITE record) and the volume's\n"
"size and times updated, exactly as the general path would.  Returns -1\n"
"when the case is another (nothing changed; the general path must do the\n"
"write), OWN_PATH_FIRST (-3) when only a node of the tree path that may not\n"
"change in place is in the way (nothing changed; Pool._own_path, then call\n"
"again), else flags of what the caller still owes: 1, Pool._after_change();\n"
"2, pool.data.start_writeback().  An exception from the data write changes\n"
"nothing; a failure after the change began makes the pool reload (as\n"
"Pool._Mutation does) and raises PoolError(EIO).");

static PyObject *
write_block(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (wrong_nargs("write_block", nargs, 4))
        return NULL;
    if (!pool_constants_loaded && load_pool_constants() < 0)
        return NULL;
    long long offset = PyLong_AsLongLong(args[2]);
    if (offset == -1 && PyErr_Occurred())
        return NULL;
    if (offset < 0 || offset % BLOCK || offset > MAX_VOLUME_SIZE - BLOCK)
        return PyLong_FromLong(NOT_MINE);
    Py_buffer db;
    if (PyObject_GetBuffer(args[3], &db, PyBUF_SIMPLE) < 0)
        return NULL;
    long r = NOT_MINE;
    struct wb w = {0};
    if (db.len == BLOCK)
        r = write_block_impl(args[0], args[1], offset, args[3], db.buf, &w);
    wb_clear(&w);
    PyBuffer_Release(&db);
    return r == -2 ? NULL : PyLong_FromLong(r);
}

/* The data units that stored blocks sectors[0..n-1] / slens[0..n-1] touch,
 * in order (format.units_of of each), in a new PyMem array *units of *m.
 * 1; 0 when a length is not 1 to BLOCK bytes or a unit is not below limit;
 * -1 with MemoryError set.  *units is to be freed in every case. */
static int
block_units(const uint64_t *sectors, const uint16_t *slens, Py_ssize_t n, uint64_t limit,
            uint64_t **units, Py_ssize_t *m)
{
    /* A stored block of at most BLOCK bytes touches one unit, or two when
     * it is packed across a unit boundary. */
    *m = 0;
    *units = PyMem_Malloc((2 * n + 1) * sizeof **units);
    if (*units == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t start = sectors[i] * (BLOCK / SECTORS_PER_BLOCK);
        uint64_t first = start / BLOCK, last = (start + slens[i] - 1) / BLOCK;
        if (slens[i] < 1 || slens[i] > BLOCK || sectors[i] >= UINT64_MAX / BLOCK
                || last >= limit)
            return 0;
        for (uint64_t u = first; u <= last; u++)
            (*units)[(*m)++] = u;
    }
    return 1;
}

/* add_page() of each of units[0..m-1]: 1, or -1 with an error set.  A
 * leaf's units mostly share a page, hence the check of the last one. */
static int
mark_pages(PyObject *pages, const uint64_t *units, Py_ssize_t m)
{
    uint64_t last_page = UINT64_MAX;
    for (Py_ssize_t i = 0; i < m; i++) {
        if (units[i] >> PAGE_SHIFT != last_page) {
            if (add_page(pages, units[i]) < 0)
                return -1;
            last_page = units[i] >> PAGE_SHIFT;
        }
    }
    return 1;
}

PyDoc_STRVAR(incref_blocks_doc,
"incref_blocks(rc, pages, sectors, slens) -> bool\n\n"
"Pool.take of each pointer of a copied leaf, in one call: RefTable.incref\n"
"of every data unit each stored block touches (format.units_of), in order.\n"
"Done when every pointer has a length of 1 to BLOCK bytes on units of the\n"
"table and every count is kept in its byte of ``rc`` (RefTable.rc) and\n"
"stays within MAX_DIRECT: each count goes up and each unit's page joins\n"
"``pages`` (RefTable.dirty_pages); True.  Otherwise no count changes (a page\n"
"may have been marked, which only costs a rewrite) and the answer is False:\n"
"the caller takes the references in Python.");

static PyObject *
incref_blocks(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (wrong_nargs("incref_blocks", nargs, 4))
        return NULL;
    PyObject *pages = args[1];
    if (!PySet_Check(pages)) {
        PyErr_SetString(PyExc_TypeError, "incref_blocks: pages must be a set");
        return NULL;
    }
    Py_buffer v[3];
    if (get_arrays(3, (PyObject *[]){args[0], args[2], args[3]}, (Py_ssize_t[]){1, 8, 2},
                   (const char *[]){"reference counts", "sectors", "lengths"}, v) < 0)
        return NULL;
    Py_buffer rc = v[0], sv = v[1], lv = v[2];
    unsigned char *counts = rc.buf;
    Py_ssize_t n = sv.len / 8, m = 0, i;
    uint64_t *units = NULL;
    int ok = n == lv.len / 2;
    if (ok == 1)
        ok = block_units(sv.buf, lv.buf, n, (uint64_t)rc.len, &units, &m);
    /* Pages first: marking one can fail (memory), raising a count cannot. */
    if (ok == 1)
        ok = mark_pages(pages, units, m);
    /* A count at 0, at MAX_DIRECT or a marker (a unit met more than once can
     * bring it there) is RefTable.incref's: undo and leave the leaf to it. */
    for (i = 0; ok == 1 && i < m; i++) {
        unsigned char *c = &counts[units[i]];
        if (*c < 1 || *c >= MAX_DIRECT) {
            while (i-- > 0)
                counts[units[i]]--;
            ok = 0;
            break;
        }
        (*c)++;
    }
    PyMem_Free(units);
    PyBuffer_Release(&lv);
    PyBuffer_Release(&sv);
    PyBuffer_Release(&rc);
    return ok < 0 ? NULL : PyBool_FromLong(ok);
}

PyDoc_STRVAR(decref_blocks_doc,
"decref_blocks(rc, pages, pending, sectors, slens, start, end) -> bool\n\n"
"Pool.drop of pointers start..end-1 of a leaf, in one call: RefTable.decref\n"
"of every data unit each stored block touches (format.units_of), in order.\n"
"Done when every pointer has a length of 1 to BLOCK bytes on units of the\n"
"table and every count is in its byte of ``rc`` (RefTable.rc), 1 to\n"
"MAX_DIRECT, when it is dropped: each count goes down, one reaching 0\n"
"becomes PENDING and its unit is appended to ``pending`` (RefTable.pending)\n"
"in that order, each unit's page joins ``pages`` (RefTable.dirty_pages);\n"
"True.  Otherwise no count changes (a page may have been marked, which only\n"
"costs a rewrite) and the answer is False: the caller drops the references\n"
"in Python.");

static PyObject *
decref_blocks(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (wrong_nargs("decref_blocks", nargs, 7))
        return NULL;
    PyObject *pages = args[1], *pending = args[2];
    if (!PySet_Check(pages) || !PyList_Check(pending)) {
        PyErr_SetString(PyExc_TypeError,
                        "decref_blocks: pages must be a set and pending a list");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[5]), end = PyLong_AsSsize_t(args[6]);
    if ((start == -1 || end == -1) && PyErr_Occurred())
        return NULL;
    Py_buffer v[3];
    if (get_arrays(3, (PyObject *[]){args[0], args[3], args[4]}, (Py_ssize_t[]){1, 8, 2},
                   (const char *[]){"reference counts", "sectors", "lengths"}, v) < 0)
        return NULL;
    Py_buffer rc = v[0], sv = v[1], lv = v[2];
    unsigned char *counts = rc.buf;
    Py_ssize_t n = sv.len / 8, m = 0, nz = 0, i;
    uint64_t *units = NULL, *zeros = NULL;
    int ok = n == lv.len / 2 && 0 <= start && start <= end && end <= n;
    if (ok == 1)
        ok = block_units((const uint64_t *)sv.buf + start, (const uint16_t *)lv.buf + start,
                         end - start, (uint64_t)rc.len, &units, &m);
    if (ok == 1)
        ok = mark_pages(pages, units, m);
    if (ok == 1 && (zeros = PyMem_Malloc((m + 1) * sizeof *zeros)) == NULL) {
        PyErr_NoMemory();
        ok = -1;
    }
    /* A count at 0 (a unit met more than once can bring it there), a marker
     * or OVERFLOW is RefTable.decref's: undo and leave the pointers to it. */
    for (i = 0; ok == 1 && i < m; i++) {
        unsigned char *c = &counts[units[i]];
        if (*c < 1 || *c > MAX_DIRECT) {
            while (i-- > 0)
                counts[units[i]]++;
            ok = 0;
            break;
        }
        if (--*c == 0)
            zeros[nz++] = units[i];
    }
    if (ok == 1) {
        /* Every count first: appending can fail (memory), and a pool whose
         * memory is then half changed reloads its durable state. */
        for (i = 0; i < nz; i++)
            counts[zeros[i]] = (unsigned char)PENDING;
        for (i = 0; ok == 1 && i < nz; i++) {
            PyObject *u = PyLong_FromUnsignedLongLong(zeros[i]);
            if (u == NULL || PyList_Append(pending, u) < 0)
                ok = -1;
            Py_XDECREF(u);
        }
    }
    PyMem_Free(zeros);
    PyMem_Free(units);
    PyBuffer_Release(&lv);
    PyBuffer_Release(&sv);
    PyBuffer_Release(&rc);
    return ok < 0 ? NULL : PyBool_FromLong(ok);
}

PyDoc_STRVAR(release_pending_doc,
"release_pending(rc, pending) -> int\n\n"
"The loop of RefTable.release_pending: every unit of the list ``pending``\n"
"whose byte in ``rc`` (RefTable.rc) is PENDING becomes 0 (free); answers how\n"
"many did.  A unit met twice counts once.  An item that is not an int, or\n"
"not a unit of the table, raises (TypeError, IndexError) with nothing\n"
"changed.  The list itself is left to the caller.");

/* In Python this loop took 36 ns a unit in order (9 us per MiB
 * overwritten, 256 units) and 162-229 ns at random places of a 4 GiB
 * table; here 1.6 and 16-25 ns. */
static PyObject *
release_pending(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (wrong_nargs("release_pending", nargs, 2))
        return NULL;
    PyObject *pending = args[1];
    if (!PyList_Check(pending)) {
        PyErr_SetString(PyExc_TypeError, "release_pending: pending must be a list");
        return NULL;
    }
    Py_buffer rc;
    if (get_array(args[0], 1, &rc, "reference counts") < 0)
        return NULL;
    unsigned char *counts = rc.buf;
    Py_ssize_t n = PyList_GET_SIZE(pending), i, released = 0;
    /* Every item checked before any byte changes, then converted again
     * (rather than kept in an array to allocate). */
    int ok = 1;
    for (i = 0; ok && i < n; i++) {
        PyObject *item = PyList_GET_ITEM(pending, i);
        if (!PyLong_Check(item)) {
            PyErr_Format(PyExc_TypeError, "release_pending: item %zd is not an int", i);
            ok = 0;
            continue;
        }
        uint64_t u = PyLong_AsUnsignedLongLong(item);
        if (u == (uint64_t)-1 && PyErr_Occurred())
            PyErr_Clear();          /* negative or huge: off the table */
        else if (u < (uint64_t)rc.len)
            continue;
        PyErr_Format(PyExc_IndexError, "release_pending: unit %R is not in the table", item);
        ok = 0;
    }
    for (i = 0; ok && i < n; i++) {
        unsigned char *c = &counts[PyLong_AsUnsignedLongLong(PyList_GET_ITEM(pending, i))];
        if (*c == PENDING) {
            *c = 0;
            released++;
        }
    }
    PyBuffer_Release(&rc);
    return ok ? PyLong_FromSsize_t(released) : NULL;
}

/* The node at meta unit addr as NodeStore.get finds it in memory (the dirty
 * nodes, then the cache, which it keeps in LRU order), or NULL without an
 * error set when it is in neither (NodeStore.get reads it from disk).
 * Returns a new reference. */
static PyObject *
cached_node(PyObject *dirty, PyObject *cache, uint64_t addr)
{
    PyObject *key = PyLong_FromUnsignedLongLong(addr);
    if (key == NULL)
        return NULL;
    PyObject *node = PyDict_GetItemWithError(dirty, key);
    if (node == NULL && !PyErr_Occurred()) {
        node = PyDict_GetItemWithError(cache, key);
        if (node != NULL) {
            Py_INCREF(node);
            PyObject *r = PyObject_CallMethodOneArg(cache, s_move_to_end, key);
            Py_DECREF(node);
            if (r == NULL)
                node = NULL;
            Py_XDECREF(r);
        }
    }
    Py_XINCREF(node);
    Py_DECREF(key);
    return node;
}

/* Pool.read of one aligned block, or NOT_MINE (Py_False) when the case is
 * not this function's; see read_block_doc. */
static PyObject *
read_block_impl(PyObject *pool, PyObject *vol_id, long long offset, PyObject *wait)
{
    int r;
    if ((r = attr_set(pool, s_closed, 0)) != 0 || (r = attr_set(pool, s_stale, 1)) != 0)
        return r < 0 ? NULL : Py_NewRef(Py_False);
    PyObject *datasets = PyObject_GetAttr(pool, s_datasets);
    if (datasets == NULL)
        return NULL;
    PyObject *v = PyDict_Check(datasets) ? PyDict_GetItemWithError(datasets, vol_id) : NULL;
    Py_XINCREF(v);
    Py_DECREF(datasets);
    if (v == NULL)
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_False);
    PyObject *result = NULL, *store = NULL, *dirty = NULL, *cache = NULL, *node = NULL;
    long long size, root;
    if (get_ll(v, s_size, &size) < 0 || get_ll(v, s_root, &root) < 0)
        goto done;
    if (offset + BLOCK > size || root <= 0) {
        result = Py_NewRef(Py_False);
        goto done;
    }
    if (!(store = PyObject_GetAttr(pool, s_store)) || !(dirty = PyObject_GetAttr(store, s_dirty))
            || !(cache = PyObject_GetAttr(store, s_cache)))
        goto done;
    if (!PyDict_Check(dirty) || !PyDict_Check(cache)) {
        PyErr_SetString(PyExc_TypeError, "read_block: unexpected node store");
        goto done;
    }
    uint64_t key = (uint64_t)offset / BLOCK, addr = (uint64_t)root;
    for (int depth = 0;; depth++) {
        if (depth == MAX_DEPTH || !(node = cached_node(dirty, cache, addr))) {
            if (!PyErr_Occurred())
                result = Py_NewRef(Py_False);
            goto done;
        }
        if ((r = attr_set(node, s_leaf, 0)) != 0) {
            if (r < 0)
                goto done;
            break;
        }
        int ok = child_of(node, key, &addr);
        Py_CLEAR(node);
        if (ok <= 0) {
            if (ok == 0)
                result = Py_NewRef(Py_False);
            goto done;
        }
    }
    Py_buffer kv, av, sv, lv;
    if (get_items(node, s_keys, 8, &kv) < 0)
        goto done;
    Py_ssize_t n = kv.len / 8, j = lower_bound(kv.buf, n, key);
    int found = j < n && ((uint64_t *)kv.buf)[j] == key;
    PyBuffer_Release(&kv);
    if (!found) {                   /* a hole reads as zeros */
        result = PyByteArray_FromStringAndSize((const char *)zero_block, BLOCK);
        goto done;
    }
    uint64_t sector, csum;
    int raw;
    Py_buffer v3[3];
    if (get_node_arrays(node, 3, (PyObject *[]){s_addrs, s_csums, s_slens},
                        (Py_ssize_t[]){8, 8, 2}, v3) < 0)
        goto done;
    av = v3[0], sv = v3[1], lv = v3[2];
    int in_range = j < av.len / 8 && j < sv.len / 8 && j < lv.len / 2;
    if (in_range) {
        sector = ((uint64_t *)av.buf)[j];
        csum = ((uint64_t *)sv.buf)[j];
        raw = ((uint16_t *)lv.buf)[j] == BLOCK;
    }
    PyBuffer_Release(&lv);
    PyBuffer_Release(&sv);
    PyBuffer_Release(&av);
    if (!in_range || !raw) {        /* compressed: the general path expands it */
        result = Py_NewRef(Py_False);
        goto done;
    }
    /* The data through Pool._pread_data: the pool file's interface, the
     * wait rules and the conversion of OSError to the pool's EIO. */
    PyObject *length = PyLong_FromLongLong(BLOCK), *where = PyLong_FromUnsignedLongLong(sector);
    PyObject *data = NULL;
    if (length != NULL && where != NULL)
        data = PyObject_CallMethodObjArgs(pool, s_pread_data, v, length, where, wait, NULL);
    Py_XDECREF(length);
    if (data == NULL || data == Py_None) {  /* an error, or not cached and not waited for */
        Py_XDECREF(where);
        result = data;
        goto done;
    }
    uint64_t got;
    if (where == NULL || checksum_of(data, &got) < 0) {
        Py_XDECREF(where);
        Py_DECREF(data);
        goto done;
    }
    if (got != csum) {              /* Pool._bad_block logs it and raises EIO */
        PyObject *block = PyLong_FromUnsignedLongLong(key);
        if (block != NULL)
            Py_XDECREF(PyObject_CallMethodObjArgs(pool, s_bad_block, v, block, where, NULL));
        Py_XDECREF(block);
        Py_DECREF(where);
        Py_DECREF(data);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "read_block: Pool._bad_block returned");
        goto done;
    }
    Py_DECREF(where);
    result = data;
done:
    Py_XDECREF(node);
    Py_XDECREF(cache);
    Py_XDECREF(dirty);
    Py_XDECREF(store);
    Py_DECREF(v);
    return result;
}

PyDoc_STRVAR(read_block_doc,
"read_block(pool, vol_id, offset, wait) -> bytes | bytearray | None | False\n\n"
"Pool.read(vol_id, offset, BLOCK, wait) for an aligned block inside the\n"
"volume or snapshot whose tree path is in memory and whose block is a hole\n"
"or stored raw: the block (zeros for a hole), or None when Pool._pread_data\n"
"answers None (not cached and not waited for).  Errors are Pool's: EIO from\n"
"_pread_data, ChecksumError from _bad_block.  Any other case answers False\n"
"having read nothing, and Pool.read takes its Python path.");

static PyObject *
read_block(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (wrong_nargs("read_block", nargs, 4))
        return NULL;
    long long offset = PyLong_AsLongLong(args[2]);
    if (offset == -1 && PyErr_Occurred())
        return NULL;
    if (offset < 0 || offset % BLOCK || offset > LLONG_MAX - BLOCK)
        Py_RETURN_FALSE;
    return read_block_impl(args[0], args[1], offset, args[3]);
}

PyDoc_STRVAR(raw_run_doc,
"raw_run(keys, addrs, slens, i, j) -> int\n\n"
"Where the run of leaf entries that starts at index i ends: the largest k\n"
"(i < k <= j) such that entries i..k-1 map consecutive blocks, each stored\n"
"raw (BLOCK bytes) right after the one before, so that one read of\n"
"(k - i) * BLOCK bytes at addrs[i] fetches them all.  i + 1 when entry i is\n"
"not raw.  keys and addrs are a leaf's 8-byte arrays, slens its 2-byte one;\n"
"IndexError unless 0 <= i < j <= their length.");

static PyObject *
raw_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (wrong_nargs("raw_run", nargs, 5))
        return NULL;
    Py_ssize_t i = PyLong_AsSsize_t(args[3]), j = PyLong_AsSsize_t(args[4]);
    if ((i == -1 || j == -1) && PyErr_Occurred())
        return NULL;
    Py_buffer v[3];
    if (get_arrays(3, args, (Py_ssize_t[]){8, 8, 2},
                   (const char *[]){"keys", "addrs", "lengths"}, v) < 0)
        return NULL;
    Py_buffer kv = v[0], av = v[1], lv = v[2];
    Py_ssize_t n = kv.len / 8, k = -1;
    if (av.len / 8 != n || lv.len / 2 != n)
        PyErr_SetString(PyExc_ValueError, "raw_run: keys, addrs and slens differ in length");
    else if (i < 0 || i >= j || j > n)
        PyErr_Format(PyExc_IndexError, "raw_run: entries %zd..%zd of %zd", i, j, n);
    else {
        const uint64_t *keys = kv.buf, *addrs = av.buf;
        const uint16_t *slens = lv.buf;
        k = i + 1;
        if (slens[i] == BLOCK)
            while (k < j && slens[k] == BLOCK && keys[k] == keys[k - 1] + 1
                   && addrs[k] == addrs[k - 1] + (uint64_t)SECTORS_PER_BLOCK)
                k++;
    }
    PyBuffer_Release(&lv);
    PyBuffer_Release(&av);
    PyBuffer_Release(&kv);
    return k < 0 ? NULL : PyLong_FromSsize_t(k);
}

PyDoc_STRVAR(first_bad_doc,
"first_bad(buf, csums, i) -> int\n\n"
"Checks the blocks of buf (a whole number of BLOCK-byte blocks) against\n"
"their checksums csums[i], csums[i + 1], ... (a leaf's 8-byte array):\n"
"the index within buf of the first block whose checksum differs, or -1 when\n"
"every one matches.  ValueError for a partial block, IndexError when csums\n"
"has too few entries.");

static PyObject *
first_bad(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (wrong_nargs("first_bad", nargs, 3))
        return NULL;
    Py_ssize_t i = PyLong_AsSsize_t(args[2]);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer bv, cv;
    if (get_blocks_and_sums(args[0], args[1], &bv, &cv) < 0)
        return NULL;
    Py_ssize_t nb = bv.len / BLOCK, bad = -1;
    int err = 0;
    if (bv.len % BLOCK) {
        PyErr_SetString(PyExc_ValueError, "first_bad: not a whole number of blocks");
        err = 1;
    } else if (i < 0 || i > cv.len / 8 - nb) {
        PyErr_Format(PyExc_IndexError, "first_bad: checksums %zd..%zd of %zd",
                     i, i + nb, cv.len / 8);
        err = 1;
    }
    const uint64_t *csums = cv.buf;
    for (Py_ssize_t m = 0; !err && m < nb; m++) {
        uint64_t sum;
        if (raw_checksum((const char *)bv.buf + m * BLOCK, BLOCK, &sum) < 0)
            err = 1;
        else if (sum != csums[i + m]) {
            bad = m;
            break;
        }
    }
    PyBuffer_Release(&cv);
    PyBuffer_Release(&bv);
    return err ? NULL : PyLong_FromSsize_t(bad);
}

PyDoc_STRVAR(block_checksums_doc,
"block_checksums(data, out) -> None\n\n"
"format.checksum of each BLOCK bytes of ``data`` (a whole number of blocks)\n"
"into ``out``, an array('Q') of exactly one item per block.  Anything else\n"
"raises (ValueError, TypeError, BufferError) with ``out`` unchanged; only a\n"
"failure of xxhash's Python function (the fallback) can leave it part filled.");

/* A multi-block write takes the checksum of every block as it came: in
 * Python, with a memoryview slice and a call per block (the list of slices
 * alone was 3.6% of the request thread's samples on 1 MiB writes). */
static PyObject *
block_checksums(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (wrong_nargs("block_checksums", nargs, 2))
        return NULL;
    Py_buffer bv, cv;
    if (get_blocks_and_sums(args[0], args[1], &bv, &cv) < 0)
        return NULL;
    Py_ssize_t nb = bv.len / BLOCK;
    int err = 0;
    if (bv.len % BLOCK || cv.len / 8 != nb) {
        PyErr_Format(PyExc_ValueError, "block_checksums: %zd bytes for %zd checksums",
                     bv.len, cv.len / 8);
        err = 1;
    }
    uint64_t *sums = cv.buf;
    for (Py_ssize_t m = 0; !err && m < nb; m++)
        err = raw_checksum((const char *)bv.buf + m * BLOCK, BLOCK, &sums[m]) < 0;
    PyBuffer_Release(&cv);
    PyBuffer_Release(&bv);
    if (err)
        return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(read_buffer_doc,
"read_buffer(length) -> bytearray\n\n"
"A bytearray of length bytes for a read to fill, not zeroed first (zeroing\n"
"1 MiB cost a tenth of the daemon's CPU in a sequential read): its bytes are\n"
"undefined until written, so the caller must discard it unless the read\n"
"filled all of it.");

static PyObject *
read_buffer(PyObject *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "read_buffer: negative length");
        return NULL;
    }
    return PyByteArray_FromStringAndSize(NULL, n);
}

PyDoc_STRVAR(page_cached_doc,
"page_cached(fd, offset, length) -> bool\n\n"
"Whether every page of the range of file fd is in the host's page cache,\n"
"asked with cachestat(2) (Linux 6.5), which unlike a read with RWF_NOWAIT\n"
"starts no read of what is missing.  OSError where the kernel lacks it.\n"
"In C it costs 0.44 us (1.3 through ctypes; a cached 4 KiB pread 0.7).");

struct cowfs_cachestat_range { uint64_t off, len; };
struct cowfs_cachestat {
    uint64_t cache, dirty, writeback, evicted, recently_evicted;
};

static PyObject *
page_cached(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (wrong_nargs("page_cached", nargs, 3))
        return NULL;
    long fd = PyLong_AsLong(args[0]);
    long long off = PyLong_AsLongLong(args[1]), len = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (off < 0 || len < 0) {
        PyErr_SetString(PyExc_ValueError, "page_cached: negative offset or length");
        return NULL;
    }
    struct cowfs_cachestat_range range = {(uint64_t)off, (uint64_t)len};
    struct cowfs_cachestat cs;
    if (syscall(451 /* cachestat, on every architecture */, (int)fd, &range, &cs, 0) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    long page = sysconf(_SC_PAGESIZE);
    return PyBool_FromLong(cs.cache * (uint64_t)page >= (uint64_t)len);
}

static PyMethodDef methods[] = {
    {"write_block", (PyCFunction)(void (*)(void))write_block, METH_FASTCALL, write_block_doc},
    {"incref_blocks", (PyCFunction)(void (*)(void))incref_blocks, METH_FASTCALL, incref_blocks_doc},
    {"decref_blocks", (PyCFunction)(void (*)(void))decref_blocks, METH_FASTCALL, decref_blocks_doc},
    {"release_pending", (PyCFunction)(void (*)(void))release_pending, METH_FASTCALL,
     release_pending_doc},
    {"raw_run", (PyCFunction)(void (*)(void))raw_run, METH_FASTCALL, raw_run_doc},
    {"first_bad", (PyCFunction)(void (*)(void))first_bad, METH_FASTCALL, first_bad_doc},
    {"block_checksums", (PyCFunction)(void (*)(void))block_checksums, METH_FASTCALL,
     block_checksums_doc},
    {"read_buffer", read_buffer, METH_O, read_buffer_doc},
    {"native_checksums", native_checksums, METH_O, native_checksums_doc},
    {"read_block", (PyCFunction)(void (*)(void))read_block, METH_FASTCALL, read_block_doc},
    {"page_cached", (PyCFunction)(void (*)(void))page_cached, METH_FASTCALL, page_cached_doc},
    {NULL, NULL, 0, NULL},
};

/* The struct format of a cowfs.journal layout must be the one packed here. */
static int
check_format(const char *name, const char *expected)
{
    PyObject *st = module_attr("cowfs.journal", name);
    PyObject *fmt = st == NULL ? NULL : PyObject_GetAttrString(st, "format");
    Py_XDECREF(st);
    if (fmt == NULL)
        return -1;
    int same = PyUnicode_Check(fmt) && PyUnicode_CompareWithASCIIString(fmt, expected) == 0;
    Py_DECREF(fmt);
    if (!same) {
        PyErr_Format(PyExc_ImportError, "cowfs._oneblock packs cowfs.journal.%s as %s, "
                     "which is no longer its layout", name, expected);
        return -1;
    }
    return 0;
}

static int
intern_names(void)
{
    struct { PyObject **slot; const char *name; } names[] = {
        {&s_leaf, "leaf"}, {&s_keys, "keys"}, {&s_addrs, "addrs"}, {&s_csums, "csums"},
        {&s_slens, "slens"}, {&s_children, "children"}, {&s_closed, "closed"},
        {&s_readonly, "readonly"}, {&s_stale, "stale"}, {&s_degraded, "degraded"},
        {&s_replaying, "_replaying"}, {&s_datasets, "datasets"}, {&s_owner, "owner"},
        {&s_root, "root"}, {&s_size, "size"}, {&s_mapped, "mapped"}, {&s_mtime, "mtime"},
        {&s_ctime, "ctime"}, {&s_store, "store"}, {&s_dirty, "dirty"}, {&s_drc, "drc"},
        {&s_mrc, "mrc"}, {&s_rc, "rc"}, {&s_pending, "pending"},
        {&s_dirty_pages, "dirty_pages"}, {&s_free, "_free"}, {&s_cursor, "_cursor"},
        {&s_journal, "journal"}, {&s_buf, "buf"}, {&s_pos, "pos"}, {&s_gen, "gen"},
        {&s_seq, "seq"}, {&s_data, "data"}, {&s_pwrite, "pwrite"},
        {&s_unflushed, "_unflushed"}, {&s_data_dirty, "_data_dirty"},
        {&s_first_unsynced, "_first_unsynced"}, {&s_times_dirty, "times_dirty"},
        {&s_lose_memory, "_lose_memory"}, {&s_label, "label"}, {&s_cache, "cache"},
        {&s_move_to_end, "move_to_end"}, {&s_pread_data, "_pread_data"},
        {&s_bad_block, "_bad_block"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (!(*names[i].slot = PyUnicode_InternFromString(names[i].name)))
            return -1;
    return 0;
}

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "cowfs._oneblock",
    "The engine's hot paths in C: the one-block write (write_block) and read "
    "(read_block), a copied leaf's references (incref_blocks), the replaced "
    "pointers' (decref_blocks), the release of freed units (release_pending) and "
    "the checksums of a multi-block write (block_checksums) and reads of many "
    "blocks (raw_run, first_bad, read_buffer).", -1, methods,
};

PyMODINIT_FUNC
PyInit__oneblock(void)
{
    if (load_constant("cowfs.format", "LEAF_CAP", &LEAF_CAP) < 0
            || load_constant("cowfs.format", "BLOCK", &BLOCK) < 0
            || load_constant("cowfs.format", "SECTORS_PER_BLOCK", &SECTORS_PER_BLOCK) < 0
            || load_constant("cowfs.spacemap", "MAX_DIRECT", &MAX_DIRECT) < 0
            || load_constant("cowfs.spacemap", "PENDING", &PENDING) < 0
            || load_constant("cowfs.spacemap", "PAGE_SHIFT", &PAGE_SHIFT) < 0
            || load_constant("cowfs.journal", "MAGIC", &JOURNAL_MAGIC) < 0
            || load_constant("cowfs.journal", "R_WRITE", &R_WRITE) < 0
            || load_constant("cowfs.journal", "HDR_SIZE", &HDR_SIZE) < 0
            || check_format("_HDR", HDR_FORMAT) < 0
            || check_format("WRITE_ONE", WRITE_ONE_FORMAT) < 0
            || intern_names() < 0)
        return NULL;
    WRITE_ONE_SIZE = 8 + 8 + 4 + 8 + 8 + 8 + 2;
    if (HDR_SIZE + WRITE_ONE_SIZE > RECORD_MAX) {
        PyErr_SetString(PyExc_ImportError, "cowfs._oneblock: record buffer too small");
        return NULL;
    }
    if (!(zero_block = PyMem_Calloc(1, BLOCK)))
        return (PyObject *)PyErr_NoMemory();
    if (!(xxh3 = module_attr("xxhash", "xxh3_64_intdigest"))
            || !(PoolError = module_attr("cowfs.errors", "PoolError")))
        return NULL;
    xxh3_native = xxh3_found = find_native_xxh3();
    PyObject *m = PyModule_Create(&moduledef);
    if (m != NULL && PyModule_AddIntConstant(m, "OWN_PATH_FIRST", OWN_PATH_FIRST) < 0)
        Py_CLEAR(m);
    return m;
}
