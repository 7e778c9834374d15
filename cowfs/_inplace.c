/*
 * cowfs._inplace: the one-block write's tree edit, when it may happen in place.
 *
 * A random 4 KiB write into a volume whose tree path was already changed since
 * the last checkpoint (every node on it dirty, one reference each) needs no
 * copy-on-write at all: the leaf entry is set or inserted, the new data unit
 * gets its first reference and the old one loses its reference.  In Python
 * that walk and the two reference-count updates cost about 280 of the ~900
 * bytecodes of the engine's work per 4 KiB write; here they are one call.
 *
 * map_raw_block() does exactly what Tree.replace() would do for that one
 * entry, or, when the case is anything else (a clean or shared node on the
 * path, a full leaf, an old pointer that is compressed or whose unit has an
 * overflowing count, a new unit that is not RESERVED), returns -1 before
 * changing anything, and the caller takes the general path.  The rules it
 * relies on are the tree's (cowfs/btree.py) and the reference table's
 * (cowfs/spacemap.py); the constants come from those modules at import, so
 * there is one definition of each.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* Read from cowfs.format and cowfs.spacemap when the module is imported. */
static long LEAF_CAP, MAX_DIRECT, PENDING, RESERVED, PAGE_SHIFT;
static long BLOCK, SECTORS_PER_BLOCK;

static PyObject *s_leaf, *s_keys, *s_addrs, *s_csums, *s_slens, *s_children;

/* Tree depth can never come near this; it only bounds a corrupt cycle. */
#define MAX_DEPTH 64

/* A writable view of an array.array with the given item size, or -1. */
static int
get_items(PyObject *node, PyObject *name, Py_ssize_t itemsize, Py_buffer *view)
{
    PyObject *arr = PyObject_GetAttr(node, name);
    if (arr == NULL)
        return -1;
    int r = PyObject_GetBuffer(arr, view, PyBUF_WRITABLE | PyBUF_FORMAT);
    Py_DECREF(arr);
    if (r < 0)
        return -1;
    if (view->itemsize != itemsize || view->ndim != 1) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_TypeError, "node %U: unexpected item size", name);
        return -1;
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
        /* The child Tree._replace would descend into: keys[0] is the node's
         * lower bound, so the index is clamped at 0. */
        Py_buffer kv, cv;
        if (get_items(node, s_keys, 8, &kv) < 0) {
            Py_DECREF(node);
            return NULL;
        }
        if (get_items(node, s_children, 8, &cv) < 0) {
            PyBuffer_Release(&kv);
            Py_DECREF(node);
            return NULL;
        }
        Py_ssize_t i = upper_bound(kv.buf, kv.len / 8, key) - 1;
        if (i < 0)
            i = 0;
        int ok = i < cv.len / 8;
        if (ok)
            addr = ((uint64_t *)cv.buf)[i];
        PyBuffer_Release(&kv);
        PyBuffer_Release(&cv);
        Py_DECREF(node);
        if (!ok)
            return NULL;
    }
    return NULL;
}

/* The edit itself, on a leaf that may change in place; -1 (as a Python int)
 * for the cases left to the general path, NULL on failure. */
static PyObject *
edit_leaf(PyObject *node, uint64_t key, uint64_t sector, uint64_t csum, unsigned char *drc,
          Py_ssize_t drc_len, PyObject *pending, PyObject *pages)
{
    uint64_t new_unit = sector / SECTORS_PER_BLOCK;
    Py_buffer kv, av, csv, sv;
    if (get_items(node, s_keys, 8, &kv) < 0)
        return NULL;
    Py_ssize_t n = kv.len / 8;
    Py_ssize_t j = lower_bound(kv.buf, n, key);
    int found = j < n && ((uint64_t *)kv.buf)[j] == key;
    PyBuffer_Release(&kv);

    if (!found) {
        if (n >= LEAF_CAP)
            return PyLong_FromLong(-1);
        /* Page first: a failure there leaves the leaf and counts untouched
         * (a page marked dirty for nothing only costs a rewrite). */
        if (add_page(pages, new_unit) < 0)
            return NULL;
        /* A failure between these inserts (memory) leaves the leaf's arrays
         * uneven; the exception makes the pool reload its durable state. */
        if (insert_item(node, s_keys, j, key) < 0
                || insert_item(node, s_addrs, j, sector) < 0
                || insert_item(node, s_csums, j, csum) < 0
                || insert_item(node, s_slens, j, (unsigned long long)BLOCK) < 0)
            return NULL;
        drc[new_unit] = 1;
        return PyLong_FromLong(1);
    }

    if (get_items(node, s_addrs, 8, &av) < 0)
        return NULL;
    if (get_items(node, s_slens, 2, &sv) < 0) {
        PyBuffer_Release(&av);
        return NULL;
    }
    if (j >= av.len / 8 || j >= sv.len / 2) {
        PyBuffer_Release(&av);
        PyBuffer_Release(&sv);
        return PyLong_FromLong(-1);
    }
    uint64_t old_sector = ((uint64_t *)av.buf)[j];
    uint16_t old_slen = ((uint16_t *)sv.buf)[j];
    uint64_t old_unit = old_sector / SECTORS_PER_BLOCK;
    /* Only a raw one-unit pointer with a count kept in its byte; any other
     * (compressed, sharing units, overflowing) is the general path's. */
    if (old_slen != BLOCK || old_sector % SECTORS_PER_BLOCK || old_unit >= (uint64_t)drc_len
            || drc[old_unit] < 1 || drc[old_unit] > MAX_DIRECT) {
        PyBuffer_Release(&av);
        PyBuffer_Release(&sv);
        return PyLong_FromLong(-1);
    }
    if (get_items(node, s_csums, 8, &csv) < 0) {
        PyBuffer_Release(&av);
        PyBuffer_Release(&sv);
        return NULL;
    }
    /* Everything that can fail first (it only adds), then the changes. */
    int err = add_page(pages, new_unit) < 0 || add_page(pages, old_unit) < 0;
    unsigned char old_count = drc[old_unit];
    if (!err && old_count == 1) {
        PyObject *u = PyLong_FromUnsignedLongLong(old_unit);
        err = u == NULL || PyList_Append(pending, u) < 0;
        Py_XDECREF(u);
    }
    if (!err) {
        drc[old_unit] = old_count == 1 ? (unsigned char)PENDING : old_count - 1;
        drc[new_unit] = 1;
        ((uint64_t *)av.buf)[j] = sector;
        ((uint64_t *)csv.buf)[j] = csum;
        ((uint16_t *)sv.buf)[j] = (uint16_t)BLOCK;
    }
    PyBuffer_Release(&av);
    PyBuffer_Release(&sv);
    PyBuffer_Release(&csv);
    if (err)
        return NULL;
    return PyLong_FromLong(0);
}

PyDoc_STRVAR(map_raw_block_doc,
"map_raw_block(dirty, mrc, root, key, drc, pending, dirty_pages, sector, csum) -> int\n\n"
"Map volume block ``key`` of the tree at ``root`` to the raw block at data\n"
"``sector`` (one whole unit, RESERVED in ``drc``) in place, if every node on\n"
"the path is in ``dirty`` with count 1 in ``mrc`` and the leaf either holds\n"
"``key`` with a raw one-unit pointer whose count is direct, or has room for it.\n"
"Then the new unit gets its reference, the old one (if any) loses one (to\n"
"PENDING, appended to ``pending``, at zero), their pages join ``dirty_pages``,\n"
"and the result is the change in mapped blocks (0 or 1).  Otherwise nothing\n"
"changes and the result is -1.");

static PyObject *
map_raw_block(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "map_raw_block takes 9 arguments");
        return NULL;
    }
    PyObject *dirty = args[0], *mrc_obj = args[1], *drc_obj = args[4];
    PyObject *pending = args[5], *pages = args[6];
    if (!PyDict_Check(dirty) || !PyByteArray_Check(mrc_obj) || !PyByteArray_Check(drc_obj)
            || !PyList_Check(pending) || !PySet_Check(pages)) {
        PyErr_SetString(PyExc_TypeError, "map_raw_block: wrong argument types");
        return NULL;
    }
    uint64_t root = PyLong_AsUnsignedLongLong(args[2]);
    uint64_t key = PyLong_AsUnsignedLongLong(args[3]);
    uint64_t sector = PyLong_AsUnsignedLongLong(args[7]);
    uint64_t csum = PyLong_AsUnsignedLongLong(args[8]);
    if (PyErr_Occurred())
        return NULL;
    unsigned char *drc = (unsigned char *)PyByteArray_AS_STRING(drc_obj);
    Py_ssize_t drc_len = PyByteArray_GET_SIZE(drc_obj);
    uint64_t new_unit = sector / SECTORS_PER_BLOCK;
    if (sector % SECTORS_PER_BLOCK || new_unit >= (uint64_t)drc_len || drc[new_unit] != RESERVED)
        return PyLong_FromLong(-1);

    PyObject *leaf = writable_leaf(dirty, (const unsigned char *)PyByteArray_AS_STRING(mrc_obj),
                                   PyByteArray_GET_SIZE(mrc_obj), root, key);
    if (leaf == NULL)
        return PyErr_Occurred() ? NULL : PyLong_FromLong(-1);
    PyObject *result = edit_leaf(leaf, key, sector, csum, drc, drc_len, pending, pages);
    Py_DECREF(leaf);
    return result;
}

static PyMethodDef methods[] = {
    {"map_raw_block", (PyCFunction)(void (*)(void))map_raw_block, METH_FASTCALL,
     map_raw_block_doc},
    {NULL, NULL, 0, NULL},
};

static int
load_constant(const char *module, const char *name, long *out)
{
    PyObject *m = PyImport_ImportModule(module);
    if (m == NULL)
        return -1;
    PyObject *v = PyObject_GetAttrString(m, name);
    Py_DECREF(m);
    if (v == NULL)
        return -1;
    *out = PyLong_AsLong(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "cowfs._inplace",
    "The one-block write's in-place tree edit (see map_raw_block).", -1, methods,
};

PyMODINIT_FUNC
PyInit__inplace(void)
{
    if (load_constant("cowfs.format", "LEAF_CAP", &LEAF_CAP) < 0
            || load_constant("cowfs.format", "BLOCK", &BLOCK) < 0
            || load_constant("cowfs.format", "SECTORS_PER_BLOCK", &SECTORS_PER_BLOCK) < 0
            || load_constant("cowfs.spacemap", "MAX_DIRECT", &MAX_DIRECT) < 0
            || load_constant("cowfs.spacemap", "PENDING", &PENDING) < 0
            || load_constant("cowfs.spacemap", "RESERVED", &RESERVED) < 0
            || load_constant("cowfs.spacemap", "PAGE_SHIFT", &PAGE_SHIFT) < 0)
        return NULL;
    if (!(s_leaf = PyUnicode_InternFromString("leaf"))
            || !(s_keys = PyUnicode_InternFromString("keys"))
            || !(s_addrs = PyUnicode_InternFromString("addrs"))
            || !(s_csums = PyUnicode_InternFromString("csums"))
            || !(s_slens = PyUnicode_InternFromString("slens"))
            || !(s_children = PyUnicode_InternFromString("children")))
        return NULL;
    return PyModule_Create(&moduledef);
}
