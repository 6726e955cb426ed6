/* SPDX-License-Identifier: MIT */
/*
 * vsockctl: a small static helper that runs INSIDE the QEMU guest of the devicehost vsock tests.
 * It never runs on the test host: the host's /dev/vsock belongs to the machine's infrastructure.
 *
 * Every result is one line on stdout starting with "DH " so that the test, which reads the guest's
 * serial console, can pick it out of kernel messages. Data is a known pattern: the little-endian
 * u64 words seed, seed+1, seed+2, ... truncated to the requested length; integrity is a CRC-32
 * (the zlib polynomial, so Python's zlib.crc32 gives the same value) of every byte.
 *
 *   vsockctl cid                          DH CID <local cid read from /dev/vsock>
 *   vsockctl send PORT N SEED M           connect to host CID 2 port PORT, send N pattern bytes,
 *                                         then read exactly M reply bytes; prints
 *                                         DH SEND port= sent= sent_crc= recv= recv_crc= ms=
 *   vsockctl refuse PORT                  connect to host CID 2 port PORT, expect failure; prints
 *                                         DH CONNFAIL port= errno= ms=   (or DH CONNECTED-UNEXPECTEDLY)
 *   vsockctl echo PORT N                  listen on PORT, print DH LISTENING port=, accept one
 *                                         connection, echo exactly N bytes back; prints
 *                                         DH ECHO port= peer_cid= peer_port= bytes= crc= ms=
 *   vsockctl sink PORT N                  listen on PORT like echo, read exactly N bytes, then write
 *                                         their CRC-32 (4 bytes, little-endian) as an end mark;
 *                                         prints DH SINK port= bytes= crc= ms=
 *   vsockctl cut PORT SEED                connect to host CID 2 port PORT and send pattern bytes until
 *                                         a write fails (the device dropped the connection, e.g. its
 *                                         worker was killed); prints DH CUTSTART port= once connected,
 *                                         then DH CUT port= sent= errno=NAME/N ms= (ms: from the last
 *                                         write that succeeded to the failure)
 *   vsockctl cpu N                        no socket at all: generate and checksum N pattern bytes,
 *                                         prints DH CPU bytes= crc= ms=  (the guest CPU's speed;
 *                                         the benchmark also runs this one natively on the host)
 *   vsockctl seqtest OUT IN N SEED SPORT SLEN
 *                                         SOCK_SEQPACKET both ways with a stream alongside, three
 *                                         processes at once: (1) connect SEQPACKET to host port OUT
 *                                         and send N messages; (2) listen SEQPACKET on IN (prints
 *                                         DH LISTENING port=IN), accept one connection and receive
 *                                         N messages, checking each; (3) "send SPORT SLEN SEED 4"
 *                                         on a stream socket (pattern SEED; the host replies with
 *                                         4 bytes).
 *                                         Message k (k = 0..N-1) of a direction is, by the
 *                                         xorshift64* generator below seeded with SEED (OUT) or
 *                                         SEED+1 (IN), 1 + next % 65536 bytes taken from offset
 *                                         next % 131072 of a 196608-byte block drawn from the same
 *                                         generator first (tests/qemu/seqmessages.py computes the
 *                                         same). Prints DH SEQSEND port= n= bytes= crc= ms= and
 *                                         DH SEQRECV port= n= good= bytes= crc= first_bad= ms=,
 *                                         where crc chains the CRC-32 of every message in order.
 *   vsockctl duplex PORT N SEED M         connect to host CID 2 port PORT; send N pattern bytes
 *                                         (SEED) while reading M bytes, at the same time (a child
 *                                         process writes, the parent reads, one socket); prints
 *                                         DH DUPLEXSENT port= bytes= sha256= ms=  (the child) and
 *                                         DH DUPLEX port= recv= sha256= ms=  (SHA-256 of the bytes
 *                                         received); any error on the connection (a reset) is a
 *                                         DH ERROR.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <sys/wait.h>
#include <linux/vm_sockets.h>

#define CHUNK 65536

static uint32_t crc_table[256];

static void crc_init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
		crc_table[i] = c;
	}
}

/* Running CRC-32 in the zlib convention: start with 0, feed chunks, result equals zlib.crc32. */
static uint32_t crc_update(uint32_t crc, const unsigned char *p, size_t n)
{
	crc = ~crc;
	for (size_t i = 0; i < n; i++)
		crc = crc_table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
	return ~crc;
}

/* Byte `offset` of the pattern stream for `seed`. */
static void pattern_fill(unsigned char *buf, uint64_t seed, uint64_t offset, size_t n)
{
	size_t i = 0;
	if (offset % 8 == 0) {
		/* Fast path: whole little-endian words (x86 guests are little-endian). */
		for (; i + 8 <= n; i += 8) {
			uint64_t word = seed + (offset + i) / 8;
			memcpy(buf + i, &word, 8);
		}
	}
	for (; i < n; i++) {
		uint64_t pos = offset + i;
		uint64_t word = seed + pos / 8;
		buf[i] = (unsigned char)(word >> (8 * (pos % 8)));
	}
}

/* SHA-256 (FIPS 180-4), for the duplex command's end-to-end digests. */
struct sha256 {
	uint32_t h[8];
	unsigned char block[64];
	size_t used;
	uint64_t bytes;
};

static const uint32_t sha256_k[64] = {
	0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
	0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
	0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
	0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
	0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
	0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
	0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
	0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
	0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
	0xc67178f2,
};

#define ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_init(struct sha256 *s)
{
	static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
				       0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
	memcpy(s->h, iv, sizeof iv);
	s->used = 0;
	s->bytes = 0;
}

static void sha256_block(struct sha256 *s, const unsigned char *p)
{
	uint32_t w[64];
	for (int i = 0; i < 16; i++)
		w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
		       (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
	for (int i = 16; i < 64; i++) {
		uint32_t s0 = ROTR(w[i - 15], 7) ^ ROTR(w[i - 15], 18) ^ (w[i - 15] >> 3);
		uint32_t s1 = ROTR(w[i - 2], 17) ^ ROTR(w[i - 2], 19) ^ (w[i - 2] >> 10);
		w[i] = w[i - 16] + s0 + w[i - 7] + s1;
	}
	uint32_t a = s->h[0], b = s->h[1], c = s->h[2], d = s->h[3];
	uint32_t e = s->h[4], f = s->h[5], g = s->h[6], h = s->h[7];
	for (int i = 0; i < 64; i++) {
		uint32_t t1 = h + (ROTR(e, 6) ^ ROTR(e, 11) ^ ROTR(e, 25)) + ((e & f) ^ (~e & g)) +
			      sha256_k[i] + w[i];
		uint32_t t2 = (ROTR(a, 2) ^ ROTR(a, 13) ^ ROTR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
		h = g;
		g = f;
		f = e;
		e = d + t1;
		d = c;
		c = b;
		b = a;
		a = t1 + t2;
	}
	s->h[0] += a;
	s->h[1] += b;
	s->h[2] += c;
	s->h[3] += d;
	s->h[4] += e;
	s->h[5] += f;
	s->h[6] += g;
	s->h[7] += h;
}

static void sha256_update(struct sha256 *s, const unsigned char *p, size_t n)
{
	s->bytes += n;
	while (n) {
		size_t take = 64 - s->used < n ? 64 - s->used : n;
		memcpy(s->block + s->used, p, take);
		s->used += take;
		p += take;
		n -= take;
		if (s->used == 64) {
			sha256_block(s, s->block);
			s->used = 0;
		}
	}
}

/* The digest as 64 lowercase hex digits (plus NUL) in `out`. */
static void sha256_hex(struct sha256 *s, char out[65])
{
	uint64_t bits = s->bytes * 8;
	unsigned char pad = 0x80;
	sha256_update(s, &pad, 1);
	unsigned char zero = 0;
	while (s->used != 56)
		sha256_update(s, &zero, 1);
	unsigned char len[8];
	for (int i = 0; i < 8; i++)
		len[i] = (unsigned char)(bits >> (56 - 8 * i));
	sha256_update(s, len, 8);
	for (int i = 0; i < 8; i++)
		snprintf(out + 8 * i, 9, "%08x", s->h[i]);
}

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

static int fail(const char *what)
{
	printf("DH ERROR %s errno=%d (%s)\n", what, errno, strerror(errno));
	fflush(stdout);
	return 1;
}

static unsigned long long parse_u64(const char *s)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (errno || *end) {
		printf("DH ERROR bad number %s\n", s);
		fflush(stdout);
		exit(2);
	}
	return v;
}

static int connect_host(unsigned int port)
{
	int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (fd < 0)
		return -1;
	struct sockaddr_vm addr;
	memset(&addr, 0, sizeof addr);
	addr.svm_family = AF_VSOCK;
	addr.svm_cid = VMADDR_CID_HOST;
	addr.svm_port = port;
	if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
		int saved = errno;
		close(fd);
		errno = saved;
		return -1;
	}
	return fd;
}

static int write_all(int fd, const unsigned char *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

static int cmd_cid(void)
{
	int fd = open("/dev/vsock", O_RDONLY);
	if (fd < 0)
		return fail("open /dev/vsock");
	unsigned int cid = 0;
	if (ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid) < 0)
		return fail("ioctl GET_LOCAL_CID");
	close(fd);
	printf("DH CID %u\n", cid);
	return 0;
}

static int cmd_send(unsigned int port, uint64_t n, uint64_t seed, uint64_t m)
{
	static unsigned char buf[CHUNK];
	double t0 = now_ms();
	int fd = connect_host(port);
	if (fd < 0)
		return fail("connect");
	uint32_t sent_crc = 0;
	for (uint64_t off = 0; off < n;) {
		size_t len = n - off < CHUNK ? (size_t)(n - off) : CHUNK;
		pattern_fill(buf, seed, off, len);
		sent_crc = crc_update(sent_crc, buf, len);
		if (write_all(fd, buf, len) < 0)
			return fail("write");
		off += len;
	}
	uint64_t got = 0;
	uint32_t recv_crc = 0;
	while (got < m) {
		size_t want = m - got < CHUNK ? (size_t)(m - got) : CHUNK;
		ssize_t r = read(fd, buf, want);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return fail("read");
		if (r == 0)
			break;
		recv_crc = crc_update(recv_crc, buf, (size_t)r);
		got += (uint64_t)r;
	}
	close(fd);
	printf("DH SEND port=%u sent=%llu sent_crc=%08x recv=%llu recv_crc=%08x ms=%.1f\n", port,
	       (unsigned long long)n, sent_crc, (unsigned long long)got, recv_crc, now_ms() - t0);
	return 0;
}

static const char *errno_name(int e)
{
	return e == ECONNRESET ? "ECONNRESET" : e == EPIPE ? "EPIPE" : e == ECONNREFUSED
		? "ECONNREFUSED" : e == ETIMEDOUT ? "ETIMEDOUT" : e == ENOTCONN ? "ENOTCONN" : "OTHER";
}

static int cmd_cut(unsigned int port, uint64_t seed)
{
	static unsigned char buf[CHUNK];
	int fd = connect_host(port);
	if (fd < 0)
		return fail("connect");
	printf("DH CUTSTART port=%u\n", port);
	fflush(stdout);
	uint64_t off = 0;
	double last = now_ms();
	for (;;) {
		pattern_fill(buf, seed, off, CHUNK);
		ssize_t w = send(fd, buf, CHUNK, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			break;
		off += (uint64_t)w;
		last = now_ms();
	}
	int e = errno;
	double ms = now_ms() - last;
	close(fd);
	printf("DH CUT port=%u sent=%llu errno=%s/%d ms=%.1f\n", port, (unsigned long long)off,
	       errno_name(e), e, ms);
	return 0;
}

static int cmd_refuse(unsigned int port)
{
	double t0 = now_ms();
	int fd = connect_host(port);
	double ms = now_ms() - t0;
	if (fd >= 0) {
		printf("DH CONNECTED-UNEXPECTEDLY port=%u ms=%.1f\n", port, ms);
		close(fd);
		return 1;
	}
	int e = errno;
	const char *name = e == ECONNRESET ? "ECONNRESET" : e == ECONNREFUSED ? "ECONNREFUSED"
			 : e == ETIMEDOUT ? "ETIMEDOUT" : "OTHER";
	printf("DH CONNFAIL port=%u errno=%s/%d ms=%.1f\n", port, name, e, ms);
	return 0;
}

static int listen_accept(unsigned int port, struct sockaddr_vm *peer)
{
	int lfd = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (lfd < 0) {
		fail("socket");
		return -1;
	}
	struct sockaddr_vm addr;
	memset(&addr, 0, sizeof addr);
	addr.svm_family = AF_VSOCK;
	addr.svm_cid = VMADDR_CID_ANY;
	addr.svm_port = port;
	if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0) {
		fail("bind");
		return -1;
	}
	if (listen(lfd, 1) < 0) {
		fail("listen");
		return -1;
	}
	printf("DH LISTENING port=%u\n", port);
	fflush(stdout);
	socklen_t plen = sizeof *peer;
	int fd = accept(lfd, (struct sockaddr *)peer, &plen);
	if (fd < 0) {
		fail("accept");
		return -1;
	}
	close(lfd);
	return fd;
}

static int cmd_sink(unsigned int port, uint64_t n)
{
	static unsigned char buf[CHUNK];
	struct sockaddr_vm peer;
	int fd = listen_accept(port, &peer);
	if (fd < 0)
		return 1;
	double t0 = now_ms();
	uint64_t got = 0;
	uint32_t crc = 0;
	while (got < n) {
		size_t want = n - got < CHUNK ? (size_t)(n - got) : CHUNK;
		ssize_t r = read(fd, buf, want);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return fail("read");
		if (r == 0)
			break;
		crc = crc_update(crc, buf, (size_t)r);
		got += (uint64_t)r;
	}
	unsigned char mark[4] = {crc & 0xff, (crc >> 8) & 0xff, (crc >> 16) & 0xff, crc >> 24};
	if (write_all(fd, mark, sizeof mark) < 0)
		return fail("write");
	close(fd);
	printf("DH SINK port=%u bytes=%llu crc=%08x ms=%.1f\n", port, (unsigned long long)got, crc,
	       now_ms() - t0);
	return 0;
}

static int cmd_echo(unsigned int port, uint64_t n)
{
	static unsigned char buf[CHUNK];
	struct sockaddr_vm peer;
	int fd = listen_accept(port, &peer);
	if (fd < 0)
		return 1;
	double t0 = now_ms();
	uint64_t got = 0;
	uint32_t crc = 0;
	while (got < n) {
		size_t want = n - got < CHUNK ? (size_t)(n - got) : CHUNK;
		ssize_t r = read(fd, buf, want);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return fail("read");
		if (r == 0)
			break;
		crc = crc_update(crc, buf, (size_t)r);
		if (write_all(fd, buf, (size_t)r) < 0)
			return fail("write");
		got += (uint64_t)r;
	}
	close(fd);
	printf("DH ECHO port=%u peer_cid=%u peer_port=%u bytes=%llu crc=%08x ms=%.1f\n", port,
	       peer.svm_cid, peer.svm_port, (unsigned long long)got, crc, now_ms() - t0);
	return 0;
}

static int cmd_cpu(uint64_t n)
{
	static unsigned char buf[CHUNK];
	double t0 = now_ms();
	uint32_t crc = 0;
	for (uint64_t off = 0; off < n;) {
		size_t len = n - off < CHUNK ? (size_t)(n - off) : CHUNK;
		pattern_fill(buf, 1, off, len);
		crc = crc_update(crc, buf, len);
		off += len;
	}
	printf("DH CPU bytes=%llu crc=%08x ms=%.1f\n", (unsigned long long)n, crc, now_ms() - t0);
	return 0;
}

/* The message generator shared with tests/qemu/seqmessages.py: xorshift64* (Vigna). */
#define SEQ_BLOCK 196608
#define SEQ_MAX 65536

struct seqgen {
	uint64_t state;
	unsigned char block[SEQ_BLOCK];
};

static uint64_t seq_next(struct seqgen *g)
{
	uint64_t x = g->state;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	g->state = x;
	return x * 0x2545F4914F6CDD1Dull;
}

static void seq_init(struct seqgen *g, uint64_t seed)
{
	g->state = seed * 2 + 1; /* never 0 */
	for (size_t i = 0; i < SEQ_BLOCK; i += 8) {
		uint64_t w = seq_next(g);
		memcpy(g->block + i, &w, 8);
	}
}

/* The next message: its length, and a pointer into the block. */
static size_t seq_message(struct seqgen *g, const unsigned char **data)
{
	size_t len = 1 + (size_t)(seq_next(g) % SEQ_MAX);
	*data = g->block + seq_next(g) % (SEQ_BLOCK - SEQ_MAX);
	return len;
}

static int cmd_seqsend(unsigned int port, uint64_t n, uint64_t seed)
{
	static struct seqgen g;
	seq_init(&g, seed);
	double t0 = now_ms();
	int fd = socket(AF_VSOCK, SOCK_SEQPACKET, 0);
	if (fd < 0)
		return fail("seqpacket socket");
	struct sockaddr_vm addr;
	memset(&addr, 0, sizeof addr);
	addr.svm_family = AF_VSOCK;
	addr.svm_cid = VMADDR_CID_HOST;
	addr.svm_port = port;
	if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
		return fail("seqpacket connect");
	uint64_t bytes = 0;
	uint32_t crc = 0;
	for (uint64_t k = 0; k < n; k++) {
		const unsigned char *data;
		size_t len = seq_message(&g, &data);
		ssize_t w;
		do
			w = send(fd, data, len, 0);
		while (w < 0 && errno == EINTR);
		if (w < 0)
			return fail("seqpacket send");
		if ((size_t)w != len) {
			printf("DH ERROR seqpacket send of %zu bytes took %zd\n", len, w);
			return 1;
		}
		crc = crc_update(crc, data, len);
		bytes += len;
	}
	/* Wait for the host's end of stream, so that nothing is lost when the socket closes. */
	char end;
	while (recv(fd, &end, 1, 0) > 0)
		;
	close(fd);
	printf("DH SEQSEND port=%u n=%llu bytes=%llu crc=%08x ms=%.1f\n", port,
	       (unsigned long long)n, (unsigned long long)bytes, crc, now_ms() - t0);
	return 0;
}

static int cmd_seqrecv(unsigned int port, uint64_t n, uint64_t seed)
{
	static struct seqgen g;
	static unsigned char buf[SEQ_MAX + 1];
	seq_init(&g, seed);
	int lfd = socket(AF_VSOCK, SOCK_SEQPACKET, 0);
	if (lfd < 0)
		return fail("seqpacket socket");
	struct sockaddr_vm addr;
	memset(&addr, 0, sizeof addr);
	addr.svm_family = AF_VSOCK;
	addr.svm_cid = VMADDR_CID_ANY;
	addr.svm_port = port;
	if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 1) < 0)
		return fail("seqpacket listen");
	printf("DH LISTENING port=%u\n", port);
	fflush(stdout);
	int fd = accept(lfd, NULL, NULL);
	if (fd < 0)
		return fail("seqpacket accept");
	close(lfd);
	double t0 = now_ms();
	uint64_t good = 0, bytes = 0, k;
	long long first_bad = -1;
	uint32_t crc = 0;
	for (k = 0; k < n; k++) {
		const unsigned char *data;
		size_t len = seq_message(&g, &data);
		ssize_t r;
		do
			r = recv(fd, buf, sizeof buf, 0);
		while (r < 0 && errno == EINTR);
		if (r < 0)
			return fail("seqpacket recv");
		if (r == 0 && len != 0)
			break; /* end of stream: the messages left are missing */
		if ((size_t)r == len && !memcmp(buf, data, len))
			good++;
		else if (first_bad < 0)
			first_bad = (long long)k;
		crc = crc_update(crc, buf, (size_t)r);
		bytes += (uint64_t)r;
	}
	close(fd);
	printf("DH SEQRECV port=%u n=%llu good=%llu bytes=%llu crc=%08x first_bad=%lld ms=%.1f\n",
	       port, (unsigned long long)k, (unsigned long long)good, (unsigned long long)bytes, crc,
	       first_bad, now_ms() - t0);
	return 0;
}

/* Send and receive on one host connection at once (see the usage comment at the top). */
static int cmd_duplex(unsigned int port, uint64_t n, uint64_t seed, uint64_t m)
{
	static unsigned char buf[CHUNK];
	double t0 = now_ms();
	int fd = connect_host(port);
	if (fd < 0)
		return fail("connect");
	pid_t child = fork();
	if (child < 0)
		return fail("fork");
	struct sha256 sha;
	char hex[65];
	sha256_init(&sha);
	if (child == 0) {
		for (uint64_t off = 0; off < n;) {
			size_t len = n - off < CHUNK ? (size_t)(n - off) : CHUNK;
			pattern_fill(buf, seed, off, len);
			sha256_update(&sha, buf, len);
			if (write_all(fd, buf, len) < 0)
				_exit(fail("write"));
			off += len;
		}
		sha256_hex(&sha, hex);
		printf("DH DUPLEXSENT port=%u bytes=%llu sha256=%s ms=%.1f\n", port,
		       (unsigned long long)n, hex, now_ms() - t0);
		fflush(stdout);
		_exit(0);
	}
	uint64_t got = 0;
	while (got < m) {
		size_t want = m - got < CHUNK ? (size_t)(m - got) : CHUNK;
		ssize_t r = read(fd, buf, want);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return fail("read");
		if (r == 0)
			break;
		sha256_update(&sha, buf, (size_t)r);
		got += (uint64_t)r;
	}
	int status;
	if (waitpid(child, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status))
		return fail("the sending process failed");
	close(fd);
	sha256_hex(&sha, hex);
	printf("DH DUPLEX port=%u recv=%llu sha256=%s ms=%.1f\n", port, (unsigned long long)got, hex,
	       now_ms() - t0);
	return got == m ? 0 : 1;
}

/* Run the three parts of seqtest at once, each in its own process; fails if any failed. */
static int cmd_seqtest(unsigned int out, unsigned int in, uint64_t n, uint64_t seed,
		       unsigned int sport, uint64_t slen)
{
	pid_t pids[3];
	for (int i = 0; i < 3; i++) {
		pids[i] = fork();
		if (pids[i] < 0)
			return fail("fork");
		if (pids[i] == 0) {
			int rc = i == 0 ? cmd_seqrecv(in, n, seed + 1)
			       : i == 1 ? cmd_seqsend(out, n, seed)
				        : cmd_send(sport, slen, seed, 4);
			fflush(stdout);
			_exit(rc);
		}
	}
	int failed = 0;
	for (int i = 0; i < 3; i++) {
		int status;
		if (waitpid(pids[i], &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status))
			failed = 1;
	}
	return failed;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	crc_init();
	if (argc == 2 && !strcmp(argv[1], "cid"))
		return cmd_cid();
	if (argc == 6 && !strcmp(argv[1], "send"))
		return cmd_send((unsigned int)parse_u64(argv[2]), parse_u64(argv[3]), parse_u64(argv[4]),
				parse_u64(argv[5]));
	if (argc == 3 && !strcmp(argv[1], "refuse"))
		return cmd_refuse((unsigned int)parse_u64(argv[2]));
	if (argc == 4 && !strcmp(argv[1], "echo"))
		return cmd_echo((unsigned int)parse_u64(argv[2]), parse_u64(argv[3]));
	if (argc == 4 && !strcmp(argv[1], "cut"))
		return cmd_cut((unsigned int)parse_u64(argv[2]), parse_u64(argv[3]));
	if (argc == 3 && !strcmp(argv[1], "cpu"))
		return cmd_cpu(parse_u64(argv[2]));
	if (argc == 4 && !strcmp(argv[1], "sink"))
		return cmd_sink((unsigned int)parse_u64(argv[2]), parse_u64(argv[3]));
	if (argc == 6 && !strcmp(argv[1], "duplex"))
		return cmd_duplex((unsigned int)parse_u64(argv[2]), parse_u64(argv[3]),
				  parse_u64(argv[4]), parse_u64(argv[5]));
	if (argc == 8 && !strcmp(argv[1], "seqtest"))
		return cmd_seqtest((unsigned int)parse_u64(argv[2]), (unsigned int)parse_u64(argv[3]),
				   parse_u64(argv[4]), parse_u64(argv[5]),
				   (unsigned int)parse_u64(argv[6]), parse_u64(argv[7]));
	printf("DH ERROR usage: vsockctl cid | send PORT N SEED M | refuse PORT | echo PORT N | sink PORT N | cpu N | seqtest OUT IN N SEED SPORT SLEN | duplex PORT N SEED M\n");
	return 2;
}
