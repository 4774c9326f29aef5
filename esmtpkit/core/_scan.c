/* Native byte scans for the DATA path: the bare CR/LF check and the search for dot-led lines (esmtpkit.data).
 *
 * Both scan in 4 KiB blocks whose inner loop has no branch and no loop-carried state, so compilers vectorise
 * it; the block boundary keeps the early exit cheap. The pure-Python code in esmtpkit/data.py gives the same
 * answers when this module is not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define BLOCK 4096

/* A region is clean when every CR is followed by LF and every LF is preceded by CR, that is: for every i >= 1,
 * (data[i] == LF) == (data[i-1] == CR), and at the two ends no LF first and no CR last. */
static int
region_has_bare_newline(const unsigned char *data, Py_ssize_t size)
{
    if (size == 0) {
        return 0;
    }
    if (data[0] == '\n' || data[size - 1] == '\r') {
        return 1;
    }
    for (Py_ssize_t start = 1; start < size; start += BLOCK) {
        Py_ssize_t stop = size - start < BLOCK ? size : start + BLOCK;
        unsigned char bad = 0;
        for (Py_ssize_t i = start; i < stop; i++) {
            bad |= (unsigned char)((data[i] == '\n') ^ (data[i - 1] == '\r'));
        }
        if (bad) {
            return 1;
        }
    }
    return 0;
}

/* Index of the first CR LF '.' at or after start, or -1: the line starts that dot-unstuffing and the end-of-data
 * marker care about. Text mail has a '.' in most lines, so this is the DATA path's main search. */
static Py_ssize_t
region_find_mark(const unsigned char *data, Py_ssize_t start, Py_ssize_t size)
{
    for (Py_ssize_t first = start; first + 2 < size; first += BLOCK) {
        Py_ssize_t stop = size - 2 - first < BLOCK ? size - 2 : first + BLOCK;
        unsigned char seen = 0;
        for (Py_ssize_t i = first; i < stop; i++) {
            seen |= (unsigned char)((data[i] == '\r') & (data[i + 1] == '\n') & (data[i + 2] == '.'));
        }
        if (seen) {
            for (Py_ssize_t i = first; i < stop; i++) {
                if (data[i] == '\r' && data[i + 1] == '\n' && data[i + 2] == '.') {
                    return i;
                }
            }
        }
    }
    return -1;
}

/* Slice-style index: negative counts from the end, then clamped to [0, size]. */
static int
slice_index(PyObject *arg, Py_ssize_t size, Py_ssize_t *out)
{
    Py_ssize_t index = PyNumber_AsSsize_t(arg, PyExc_OverflowError);
    if (index == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (index < 0) {
        index += size;
        if (index < 0) {
            index = 0;
        }
    }
    else if (index > size) {
        index = size;
    }
    *out = index;
    return 0;
}

PyDoc_STRVAR(find_mark_doc,
"find_mark(data, start=0, /)\n--\n\n"
"data.find(b'\\r\\n.', start): where the next line starting with a dot begins, or -1.");

static PyObject *
find_mark(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t start = 0;
    Py_ssize_t found;

    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "find_mark() takes data and an optional start");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (nargs == 2 && slice_index(args[1], view.len, &start) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    found = region_find_mark((const unsigned char *)view.buf, start, view.len);
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(found);
}

PyDoc_STRVAR(has_bare_newline_doc,
"has_bare_newline(data, end=None, /)\n--\n\n"
"True if data[:end] holds a CR not followed by LF or an LF not preceded by CR.");

static PyObject *
has_bare_newline(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t end;
    int found;

    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "has_bare_newline() takes data and an optional end");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    end = view.len;
    if (nargs == 2 && args[1] != Py_None && slice_index(args[1], view.len, &end) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    found = region_has_bare_newline((const unsigned char *)view.buf, end);
    PyBuffer_Release(&view);
    return PyBool_FromLong(found);
}

static PyMethodDef scan_methods[] = {
    {"has_bare_newline", (PyCFunction)(void (*)(void))has_bare_newline, METH_FASTCALL, has_bare_newline_doc},
    {"find_mark", (PyCFunction)(void (*)(void))find_mark, METH_FASTCALL, find_mark_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef_Slot scan_slots[] = {
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#ifdef Py_mod_gil
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef scan_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "esmtpkit._scan",
    .m_doc = "Native byte scans for the DATA path (optional; esmtpkit.data falls back to pure Python).",
    .m_size = 0,
    .m_methods = scan_methods,
    .m_slots = scan_slots,
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    return PyModuleDef_Init(&scan_module);
}
