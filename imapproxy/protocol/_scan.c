/* The response scanner's loop in C: scanner.py's ``_scan_python`` byte for byte.
 *
 * A webmail page's FETCH reply is some fifty literals; in Python each costs a regex search
 * over the line before it (the engine walks every byte) and a handful of calls. Here the same
 * walk is one call per read. scanner.py keeps the pure-Python loop, used when this module is
 * not built, and the tests hold both to the same events for any input (tests/test_scanner.py).
 *
 * scan(buf, end, literal_remaining, events) -> (carry, literal_remaining, at_boundary, broken)
 *
 * buf[:end] is scanned; events (a list) gets (tag, WORD) tuples appended in stream order;
 * carry, at_boundary and broken mean what ResponseScanner's attributes and return value mean
 * (broken: this call found the stream broken; the caller keeps it set for good).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define CARRY_BYTES 32
#define MAX_TAGGED_PREFIX_BYTES 1024
#define MAX_LITERAL_DIGITS 10

/* \{([0-9]{1,10})\+?\}\r\n at p, wholly before end: the match's end, or -1; *size set. */
static Py_ssize_t literal_at(const unsigned char *b, Py_ssize_t p, Py_ssize_t end,
                             long long *size)
{
    Py_ssize_t q = p + 1;
    long long value = 0;
    int digits = 0;
    while (q < end && digits < MAX_LITERAL_DIGITS && b[q] >= '0' && b[q] <= '9') {
        value = value * 10 + (b[q] - '0');
        q++;
        digits++;
    }
    if (digits == 0)
        return -1;
    if (q < end && b[q] == '+')
        q++;
    if (q + 3 > end || b[q] != '}' || b[q + 1] != '\r' || b[q + 2] != '\n')
        return -1;
    *size = value;
    return q + 3;
}

static int starts_with(const unsigned char *b, Py_ssize_t p, Py_ssize_t end, const char *text)
{
    size_t n = strlen(text);
    return (size_t)(end - p) >= n && memcmp(b + p, text, n) == 0;
}

static int append_event(PyObject *events, const char *tag, Py_ssize_t tag_len, const char *word,
                        Py_ssize_t word_len)
{
    PyObject *event = Py_BuildValue("(y#y#)", tag, tag_len, word, word_len);
    if (event == NULL)
        return -1;
    int failed = PyList_Append(events, event);
    Py_DECREF(event);
    return failed;
}

/* The tagged line at ``line``: its word's end, ``line`` when broken, -1 when not complete,
 * -2 on a Python error. scanner.py's ``_tagged_line``. */
static Py_ssize_t tagged_line(const unsigned char *b, Py_ssize_t line, Py_ssize_t end,
                              PyObject *events, int *broken)
{
    Py_ssize_t limit = line + MAX_TAGGED_PREFIX_BYTES < end ? line + MAX_TAGGED_PREFIX_BYTES : end;
    Py_ssize_t tag_end = -1, word_end = -1, q;
    for (q = line; q < limit; q++) {
        if (b[q] == ' ') {
            tag_end = q;
            break;
        }
    }
    if (tag_end >= 0) {
        for (q = tag_end + 1; q < limit; q++) {
            if (b[q] == ' ' || b[q] == '\r') {
                word_end = q;
                break;
            }
        }
    }
    if (word_end < 0) {
        if (limit == end)
            return -1;
        *broken = 1; /* no "tag SP word" where one must be */
        return line;
    }
    if (tag_end == line || memchr(b + line, '\r', tag_end - line) != NULL ||
        memchr(b + line, '\n', tag_end - line) != NULL) {
        *broken = 1;
        return line;
    }
    Py_ssize_t word_len = word_end - tag_end - 1;
    char small[64];
    char *word = word_len <= (Py_ssize_t)sizeof small ? small : PyMem_Malloc(word_len ? word_len : 1);
    if (word == NULL) {
        PyErr_NoMemory();
        return -2;
    }
    for (q = 0; q < word_len; q++) {
        unsigned char c = b[tag_end + 1 + q];
        word[q] = (char)(c >= 'a' && c <= 'z' ? c - 32 : c); /* bytes.upper(): ASCII only */
    }
    int failed = append_event(events, (const char *)b + line, tag_end - line, word, word_len);
    if (word != small)
        PyMem_Free(word);
    return failed ? -2 : word_end;
}

static PyObject *result(Py_ssize_t carry, long long remaining, int at_boundary, int broken)
{
    return Py_BuildValue("(nLOO)", carry, remaining, at_boundary ? Py_True : Py_False,
                         broken ? Py_True : Py_False);
}

static PyObject *scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t end;
    long long remaining;
    (void)module;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "scan(buf, end, literal_remaining, events)");
        return NULL;
    }
    end = PyLong_AsSsize_t(args[1]);
    remaining = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *events = args[3];
    if (!PyList_Check(events)) {
        PyErr_SetString(PyExc_TypeError, "events must be a list");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *out = NULL;
    if (end < 0 || end > view.len || remaining < 0) {
        PyErr_SetString(PyExc_ValueError, "end or literal_remaining out of range");
        goto done;
    }
    const unsigned char *b = view.buf;
    Py_ssize_t pos = 0, resume = 0;
    int broken = 0;
    if (remaining) {
        if (remaining >= end) {
            out = result(0, remaining - end, 0, 0);
            goto done;
        }
        pos = resume = (Py_ssize_t)remaining;
        remaining = 0;
    }
    Py_ssize_t p = pos;
    while (p < end) {
        unsigned char c = b[p];
        if (c == '{') {
            long long size;
            Py_ssize_t after = literal_at(b, p, end, &size);
            if (after < 0) {
                p++;
                continue;
            }
            if (size > (long long)(end - after)) {
                out = result(0, size - (end - after), 0, broken);
                goto done;
            }
            p = pos = resume = after + (Py_ssize_t)size;
            continue;
        }
        if (c != '\r' || p + 2 >= end || b[p + 1] != '\n') {
            p++;
            continue;
        }
        Py_ssize_t line = p + 2;
        if (b[line] == '*') { /* \r\n\* (?:FLAGS|OK \[PERMANENTFLAGS) */
            if (starts_with(b, line, end, "* FLAGS") ||
                starts_with(b, line, end, "* OK [PERMANENTFLAGS")) {
                if (append_event(events, "*", 1, "FLAGS", 5) < 0)
                    goto done;
                p = pos = line;
                continue;
            }
            p++;
            continue;
        }
        if (b[line] == '+') {
            if (append_event(events, "+", 1, "", 0) < 0)
                goto done;
            p = pos = line;
            continue;
        }
        Py_ssize_t word_end = tagged_line(b, line, end, events, &broken);
        if (word_end == -2)
            goto done;
        if (word_end == -1) { /* "tag SP word" not complete yet: keep the line start */
            out = result(end - p, 0, 0, broken);
            goto done;
        }
        p = pos = word_end;
    }
    int at_boundary = end - 2 >= resume && b[end - 2] == '\r' && b[end - 1] == '\n';
    Py_ssize_t carry = end - pos < CARRY_BYTES ? end - pos : CARRY_BYTES;
    out = result(carry, 0, at_boundary, broken);
done:
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef methods[] = {
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "scan(buf, end, literal_remaining, events) -> (carry, literal_remaining, at_boundary, "
     "broken)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "imapproxy.protocol._scan",
    .m_doc = "The response scanner's loop in C (see scanner.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__scan(void) { return PyModule_Create(&module); }
