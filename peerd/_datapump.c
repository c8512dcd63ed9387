/* Native inner loops of the data plane's record layer (peerd.datapump).
 *
 * The Python driver (peerd.datastream) spent about as much CPU per byte on
 * its own per-record bookkeeping as the cipher itself: a header pack, nonce,
 * two buffer exports and a syscall wrapper per record, each with the GIL.
 * These two functions run the same record format for a whole message (or as
 * much of it as the socket takes without blocking) with the GIL released:
 *
 *   u8 kind | u32 big-endian body length | ciphertext | 32-byte tag
 *
 * AEGIS-128L, AEGIS-128X2 or AEGIS-128X4 (the session's choice), the 5 header bytes as
 * associated data, the nonce u32 epoch | u64 counter | 4 zero bytes
 * (peerd/record.py is the reference). The ciphers are libsodium's (pynacl)
 * and libaegis's (pyaegis), reached through function pointers that
 * peerd.datapump takes from their cffi modules, so this module links
 * against nothing but libc.
 *
 * Nothing here owns state between calls: the caller passes the key schedule
 * (key, epoch, first counter, records left before the next rekey) and the
 * position in the message, and gets the new position and counts back. A call
 * stops at the key's last record (REKEY), when the socket would block
 * (AGAIN, unless told to wait), on an error, or when the message is done.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define HDR 5
#define TAG 32
#define KEY_BYTES 16
#define NONCE_BYTES 16
/* How often a blocked sender looks at its stop flag; shutting the socket
 * down wakes it at once anyway. */
#define POLL_TICK_MS 200

/* libsodium's combined-mode AEGIS-128L. */
typedef int (*sodium_enc_fn)(unsigned char *c, unsigned long long *clen, const unsigned char *m,
                             unsigned long long mlen, const unsigned char *ad,
                             unsigned long long adlen, const unsigned char *nsec,
                             const unsigned char *npub, const unsigned char *k);
typedef int (*sodium_dec_fn)(unsigned char *m, unsigned long long *mlen, unsigned char *nsec,
                             const unsigned char *c, unsigned long long clen,
                             const unsigned char *ad, unsigned long long adlen,
                             const unsigned char *npub, const unsigned char *k);
/* libaegis's combined-mode AEGIS-128X2 and -128X4 (the tag length is an argument). */
typedef int (*aegis_enc_fn)(uint8_t *c, size_t maclen, const uint8_t *m, size_t mlen,
                            const uint8_t *ad, size_t adlen, const uint8_t *npub,
                            const uint8_t *k);
typedef int (*aegis_dec_fn)(uint8_t *m, const uint8_t *c, size_t clen, size_t maclen,
                            const uint8_t *ad, size_t adlen, const uint8_t *npub,
                            const uint8_t *k);

/* Cipher ids (peerd.datapump.CIPHER_IDS); each has its library's signature. */
enum { SODIUM_AEGIS128L = 0, LIBAEGIS_AEGIS128X2 = 1, LIBAEGIS_AEGIS128X4 = 2, N_CIPHERS = 3 };
static void *g_encrypt[N_CIPHERS];
static void *g_decrypt[N_CIPHERS];

static void seal(int cipher, unsigned char *c, const unsigned char *m, size_t mlen,
                 const unsigned char *ad, const unsigned char *npub, const unsigned char *k) {
    if (cipher == SODIUM_AEGIS128L)
        ((sodium_enc_fn)g_encrypt[cipher])(c, NULL, m, mlen, ad, HDR, NULL, npub, k);
    else
        ((aegis_enc_fn)g_encrypt[cipher])(c, TAG, m, mlen, ad, HDR, npub, k);
}

/* 0 when the record authenticates. */
static int open_record(int cipher, unsigned char *m, const unsigned char *c, size_t clen,
                       const unsigned char *ad, const unsigned char *npub,
                       const unsigned char *k) {
    if (cipher == SODIUM_AEGIS128L)
        return ((sodium_dec_fn)g_decrypt[cipher])(m, NULL, NULL, c, clen, ad, HDR, npub, k);
    return ((aegis_dec_fn)g_decrypt[cipher])(m, c, clen, TAG, ad, HDR, npub, k);
}

enum status {
    ST_DONE = 0,
    ST_AGAIN = 1,      /* the socket would block; call again when it is ready */
    ST_REKEY = 2,      /* the key's records are used up; rekey, call again */
    ST_STOPPED = 3,    /* the stop flag was set while waiting */
    ST_OSERROR = 4,    /* errno in the result */
    ST_EOF = 5,        /* the stream ended; the position says where */
    ST_BADHEADER = 6,  /* the header buffer holds a header this message cannot take */
    ST_AUTH = 7,       /* a record failed authentication */
};

static void make_nonce(unsigned char out[NONCE_BYTES], uint32_t epoch, uint64_t counter) {
    for (int i = 0; i < 4; i++) out[i] = (unsigned char)(epoch >> (24 - 8 * i));
    for (int i = 0; i < 8; i++) out[4 + i] = (unsigned char)(counter >> (56 - 8 * i));
    memset(out + 12, 0, NONCE_BYTES - 12);
}

static void put_be32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static uint32_t get_be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static int cipher_ready(int cipher) {
    if (cipher < 0 || cipher >= N_CIPHERS) {
        PyErr_SetString(PyExc_ValueError, "peerd._datapump: unknown cipher id");
        return 0;
    }
    if (g_encrypt[cipher] == NULL || g_decrypt[cipher] == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "peerd._datapump: set_cipher was not called");
        return 0;
    }
    return 1;
}

static PyObject *set_cipher(PyObject *self, PyObject *args) {
    int cipher;
    unsigned long long enc, dec;
    if (!PyArg_ParseTuple(args, "iKK", &cipher, &enc, &dec)) return NULL;
    if (cipher < 0 || cipher >= N_CIPHERS) {
        PyErr_SetString(PyExc_ValueError, "unknown cipher id");
        return NULL;
    }
    if (enc == 0 || dec == 0) {
        PyErr_SetString(PyExc_ValueError, "cipher function addresses must not be null");
        return NULL;
    }
    g_encrypt[cipher] = (void *)(uintptr_t)enc;
    g_decrypt[cipher] = (void *)(uintptr_t)dec;
    Py_RETURN_NONE;
}

/* send_step(fd, block, stop, cipher, key, epoch, counter, limit, kind, max_record,
 *           payload, off, wbuf, wpos, wlen)
 *   -> (status, errno, off, wpos, wlen, records, plaintext_bytes, written)
 *
 * wbuf[wpos:wlen] holds sealed bytes not yet written (the caller seals the
 * message's head there). Payload records from payload[off:] are sealed into
 * wbuf whenever it has been written out (packed after bytes not yet started),
 * and written. With ``block`` the call waits for the socket (poll), looking
 * at stop[0] every POLL_TICK_MS; without, it returns AGAIN. */
static PyObject *send_step(PyObject *self, PyObject *args) {
    int fd, block, cipher, kind;
    PyObject *stop_obj;
    Py_buffer key, payload, wbuf, stop = {0};
    unsigned long epoch;
    unsigned long long counter, limit;
    Py_ssize_t max_record, off, wpos, wlen;
    if (!PyArg_ParseTuple(args, "ipOiy*kKKiny*nw*nn", &fd, &block, &stop_obj, &cipher, &key,
                          &epoch, &counter, &limit, &kind, &max_record, &payload, &off, &wbuf,
                          &wpos, &wlen))
        return NULL;
    PyObject *result = NULL;
    int have_stop = 0;
    if (stop_obj != Py_None) {
        if (PyObject_GetBuffer(stop_obj, &stop, PyBUF_WRITABLE) < 0) goto out;
        have_stop = 1;
    }
    if (!cipher_ready(cipher)) goto out;
    if (key.len != KEY_BYTES || kind < 0 || kind > 255 || max_record <= 0 || off < 0 ||
        off > payload.len || wpos < 0 || wpos > wlen || wlen > wbuf.len ||
        (have_stop && stop.len < 1) || epoch > 0xFFFFFFFFUL) {
        PyErr_SetString(PyExc_ValueError, "send_step: inconsistent arguments");
        goto out;
    }
    if (max_record + HDR + TAG > wbuf.len) {
        PyErr_SetString(PyExc_ValueError, "send_step: write buffer smaller than one record");
        goto out;
    }
    {
        const unsigned char *src = payload.buf;
        unsigned char *buf = wbuf.buf;
        volatile unsigned char *stopflag = have_stop ? (volatile unsigned char *)stop.buf : NULL;
        Py_ssize_t plen = payload.len, cap = wbuf.len;
        unsigned long long records = 0, plain = 0, written = 0;
        int status = ST_DONE, err = 0;
        unsigned char nonce[NONCE_BYTES];
        Py_BEGIN_ALLOW_THREADS
        for (;;) {
            if (wpos == wlen) wpos = wlen = 0;
            if (wpos == 0) {
                /* Seal while the next record fits behind what is buffered: the
                 * head goes out in one write with the first payload record. */
                while (off < plen && records < limit) {
                    Py_ssize_t n = plen - off < max_record ? plen - off : max_record;
                    if (wlen + HDR + n + TAG > cap) break;
                    unsigned char *rec = buf + wlen;
                    rec[0] = (unsigned char)kind;
                    put_be32(rec + 1, (uint32_t)(n + TAG));
                    make_nonce(nonce, (uint32_t)epoch, counter + records);
                    seal(cipher, rec + HDR, src + off, (size_t)n, rec, nonce, key.buf);
                    wlen += HDR + n + TAG;
                    off += n;
                    records++;
                    plain += (unsigned long long)n;
                }
            }
            if (wpos == wlen) {
                status = off < plen ? ST_REKEY : ST_DONE;
                break;
            }
            ssize_t w = send(fd, buf + wpos, (size_t)(wlen - wpos), MSG_NOSIGNAL);
            if (w > 0) {
                wpos += w;
                written += (unsigned long long)w;
                continue;
            }
            if (w < 0 && errno == EINTR) continue;
            if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                if (!block) {
                    status = ST_AGAIN;
                    break;
                }
                if (stopflag != NULL && *stopflag) {
                    status = ST_STOPPED;
                    break;
                }
                struct pollfd p = {.fd = fd, .events = POLLOUT, .revents = 0};
                poll(&p, 1, POLL_TICK_MS);
                continue;
            }
            status = ST_OSERROR;
            err = w < 0 ? errno : EPIPE;
            break;
        }
        Py_END_ALLOW_THREADS
        result = Py_BuildValue("iinnnKKK", status, err, off, wpos, wlen, records, plain, written);
    }
out:
    if (have_stop) PyBuffer_Release(&stop);
    PyBuffer_Release(&key);
    PyBuffer_Release(&payload);
    PyBuffer_Release(&wbuf);
    return result;
}

/* Read into buf[*got:want]; returns a status, ST_DONE once full. */
static int fill(int fd, unsigned char *buf, Py_ssize_t want, Py_ssize_t *got,
                unsigned long long *nread, int *err) {
    while (*got < want) {
        ssize_t r = read(fd, buf + *got, (size_t)(want - *got));
        if (r > 0) {
            *got += r;
            *nread += (unsigned long long)r;
            continue;
        }
        if (r == 0) return ST_EOF;
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return ST_AGAIN;
        *err = errno;
        return ST_OSERROR;
    }
    return ST_DONE;
}

/* recv_step(fd, cipher, key, epoch, counter, limit, kind, max_record, hdr, hdr_got,
 *           rbuf, body_got, dest, off, left, scratch)
 *   -> (status, errno, hdr_got, body_got, off, left, records, read)
 *
 * Reads the payload records of one message without blocking: each header
 * into ``hdr``, each body into ``rbuf``, then authenticates and decrypts it
 * into dest[off:] (or into ``scratch``, to be dropped, where dest is None;
 * one of the two must be given).
 * A header whose kind is not ``kind`` or whose length is not 1..left (and at
 * most max_record) stops the call with BADHEADER before its body is read. */
static PyObject *recv_step(PyObject *self, PyObject *args) {
    int fd, cipher, kind;
    PyObject *dest_obj, *scratch_obj;
    Py_buffer key, hdr, rbuf, dest = {0}, scratch = {0};
    unsigned long epoch;
    unsigned long long counter, limit;
    Py_ssize_t max_record, hdr_got, body_got, off, left;
    if (!PyArg_ParseTuple(args, "iiy*kKKinw*nw*nOnnO", &fd, &cipher, &key, &epoch, &counter,
                          &limit, &kind, &max_record, &hdr, &hdr_got, &rbuf, &body_got, &dest_obj,
                          &off, &left, &scratch_obj))
        return NULL;
    PyObject *result = NULL;
    int have_dest = 0, have_scratch = 0;
    if (dest_obj != Py_None) {
        if (PyObject_GetBuffer(dest_obj, &dest, PyBUF_WRITABLE) < 0) goto out;
        have_dest = 1;
    }
    if (scratch_obj != Py_None) {
        if (PyObject_GetBuffer(scratch_obj, &scratch, PyBUF_WRITABLE) < 0) goto out;
        have_scratch = 1;
    }
    if (!cipher_ready(cipher)) goto out;
    if (key.len != KEY_BYTES || hdr.len != HDR || hdr_got < 0 || hdr_got > HDR ||
        body_got < 0 || off < 0 || left < 0 || max_record <= 0 || epoch > 0xFFFFFFFFUL ||
        rbuf.len < max_record + TAG || (have_scratch && scratch.len < max_record) ||
        (!have_dest && !have_scratch) || (have_dest && off + left > dest.len)) {
        PyErr_SetString(PyExc_ValueError, "recv_step: inconsistent arguments");
        goto out;
    }
    {
        unsigned char *h = hdr.buf, *body = rbuf.buf;
        unsigned long long records = 0, nread = 0;
        int status = ST_DONE, err = 0;
        unsigned char nonce[NONCE_BYTES];
        Py_BEGIN_ALLOW_THREADS
        while (left > 0) {
            if (hdr_got < HDR) {
                status = fill(fd, h, HDR, &hdr_got, &nread, &err);
                if (status != ST_DONE) break;
            }
            uint32_t blen = get_be32(h + 1);
            if (h[0] != kind || blen <= TAG || (Py_ssize_t)(blen - TAG) > max_record ||
                (Py_ssize_t)(blen - TAG) > left) {
                status = ST_BADHEADER;
                break;
            }
            Py_ssize_t n = (Py_ssize_t)blen - TAG;
            status = fill(fd, body, (Py_ssize_t)blen, &body_got, &nread, &err);
            if (status != ST_DONE) break;
            if (records == limit) {
                status = ST_REKEY;
                break;
            }
            unsigned char *out = have_dest ? (unsigned char *)dest.buf + off : scratch.buf;
            make_nonce(nonce, (uint32_t)epoch, counter + records);
            if (open_record(cipher, out, body, blen, h, nonce, key.buf) != 0) {
                status = ST_AUTH;
                break;
            }
            records++;
            off += n;
            left -= n;
            hdr_got = 0;
            body_got = 0;
            status = ST_DONE;
        }
        Py_END_ALLOW_THREADS
        result = Py_BuildValue("iinnnnKK", status, err, hdr_got, body_got, off, left, records,
                               nread);
    }
out:
    if (have_dest) PyBuffer_Release(&dest);
    if (have_scratch) PyBuffer_Release(&scratch);
    PyBuffer_Release(&key);
    PyBuffer_Release(&hdr);
    PyBuffer_Release(&rbuf);
    return result;
}

static PyMethodDef methods[] = {
    {"set_cipher", set_cipher, METH_VARARGS,
     "set_cipher(id, encrypt_addr, decrypt_addr): a cipher's combined-mode functions."},
    {"send_step", send_step, METH_VARARGS, "Seal and write a message's records."},
    {"recv_step", recv_step, METH_VARARGS, "Read, authenticate and decrypt payload records."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "peerd._datapump",
    "Native record loops of the data plane (see peerd.datapump).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__datapump(void) { return PyModule_Create(&module); }
