/*
 * sc_device_auth: device and adaptor accounts for Mosquitto 2.0 at 100k scale (a v5 plugin).
 *
 * Why: the dynamic security plugin rewrites its whole JSON file after every changing command, so
 * issuing a device's credentials costs more the more devices there are (12 ms each on an empty broker,
 * 240 ms at 10,000: about 30 hours for 100,000). This plugin keeps device accounts in a hash table and
 * an append-only journal instead: a batch of 1,000 new devices is one control message, one write and
 * one fsync. Adaptor accounts (svc.adaptor.*) are here too, since their rights are computed from the
 * device records. Other service accounts (the gateway, the admin, the stack's svc.publisher) stay in the
 * dynamic security plugin.
 *
 * What a device may do (fixed, not configurable): log in with username = client id = its device id
 * and its password; publish exactly to sc/v1/{type}/{id}/telemetry, /event and /status; subscribe to
 * and receive exactly sc/v1/{type}/{id}/cmd; unsubscribe. Everything else is denied.
 *
 * Adaptors (svc.adaptor.<name>: an NB-IoT platform's push, a LoRaWAN network server) publish for many
 * devices over one connection. What an adaptor may do (fixed): log in with its password and a client id
 * that is its username or its username + "." + anything (one adaptor, several connections); publish
 * exactly to sc/v1/{type}/{id}/telemetry, /event and /status of the enabled devices assigned to it (the
 * type from the device's own record); subscribe to sc/v1/+/+/cmd, $share/<its username>/sc/v1/+/+/cmd
 * or the cmd topic of one of those devices, and receive the cmd messages of those devices only;
 * unsubscribe. Everything else is denied. A device is assigned to at most one adaptor (a field of the
 * device record: one lookup per publish); assigning it to another moves it. Its adaptor may not publish
 * for it while it is disabled, nor once it is deleted (a device created again under that id starts
 * unassigned).
 *
 * For a username this plugin does not know, every check answers MOSQ_ERR_PLUGIN_DEFER: the next plugin
 * (the dynamic security plugin, loaded after this one) decides. For a username it knows, it decides
 * alone and never defers.
 *
 * Administration: JSON commands on $CONTROL/sc-device-auth/v1, answered on
 * $CONTROL/sc-device-auth/v1/response to the requesting client only; the request/response shape is the
 * dynamic security plugin's. Who may publish there is decided by the ACL check of the admin's account
 * (in the dynamic security plugin). See mosquitto/README.md for the commands.
 *
 * Passwords never reach the broker: the admin sends salt (16 random bytes) and
 * hash = SHA-256(salt || password), both base64. Every password is 256 random bits made by the
 * project (secrets.token_urlsafe(32)), so it cannot be guessed from its hash, and a slow KDF (PBKDF2,
 * bcrypt) would add cost at every CONNECT without adding security. Hashes are compared in constant time.
 *
 * Options (plugin_opt_* lines after this plugin's `plugin` line):
 *   devices_file  the journal, e.g. <data_dir>/device-accounts.journal (required)
 *   device_types  comma-separated device types that createDevices accepts (required)
 *
 * Journal: text, one line per change, written once per control message and fsync'd before the
 * answer is sent; replayed at start-up; compacted (tmp file + fsync + rename) when it holds far more
 * lines than there are devices. A torn last line (a crash in the middle of a write) is skipped with a
 * warning and cut off; a malformed line anywhere else stops the broker from starting, since skipping
 * it could silently undo a disable or a delete. Format:
 *   sc-device-auth journal 1                   header (first line)
 *   C <username> <type> <salt> <hash> <0|1>    device created (or restated by compaction), disabled?
 *   P <username> <salt> <hash>                 password changed
 *   D <username>                               disabled
 *   E <username>                               enabled
 *   X <username>                               deleted
 *   A <adaptor> <salt> <hash> <0|1>            adaptor created (or restated by compaction), disabled?
 *   M <device> <adaptor>                       device assigned to the adaptor (moved if it had another)
 *   U <device>                                 device unassigned
 * P, D, E and X apply to a device or to an adaptor, by the username (only adaptors' contain a "."). A
 * deleted device loses its assignment; a deleted adaptor's devices are unassigned. An older plugin
 * refuses to start on a journal with adaptor lines (an unknown line is malformed), which is the safe
 * way to fail.
 */

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define PLUGIN_NAME "sc-device-auth"
#define CONTROL_TOPIC "$CONTROL/sc-device-auth/v1"
#define RESPONSE_TOPIC "$CONTROL/sc-device-auth/v1/response"
#define JOURNAL_HEADER "sc-device-auth journal 1"

#define USERNAME_MAX 64
#define TYPE_MAX 32
#define MAX_TYPES 256
#define SALT_LEN 16
#define HASH_LEN 32
#define SALT_B64_LEN 24
#define HASH_B64_LEN 44
#define LINE_MAX_LEN 256
/* Compact when the journal has more than 2 lines per device plus this slack. */
#define COMPACT_SLACK 1024
#define LIST_MAX 100000
/* Adaptors: "svc.adaptor." + 1-52 of A-Z a-z 0-9 _ - (so a username fits USERNAME_MAX, and a "." after
 * the username starts a connection suffix that no other adaptor's name can continue). */
#define ADAPTOR_PREFIX "svc.adaptor."
#define ADAPTOR_PREFIX_LEN 12
#define ADAPTOR_WILDCARD_CMD "sc/v1/+/+/cmd"

#define ERR_NOT_FOUND "Client not found"
#define ERR_EXISTS "Client already exists"
#define ERR_NOT_ASSIGNED "Not assigned to this adaptor"

#define UNUSED(x) (void)(x)

struct adaptor {
	struct adaptor *next; /* hash chain */
	uint32_t hashv;
	bool disabled;
	size_t device_count; /* devices assigned to it */
	unsigned char salt[SALT_LEN];
	unsigned char hash[HASH_LEN];
	char username[USERNAME_MAX + 1];
};

struct device {
	struct device *next; /* hash chain */
	struct adaptor *adaptor; /* the adaptor that may publish for it, or NULL */
	uint32_t hashv;
	uint16_t type;
	bool disabled;
	unsigned char salt[SALT_LEN];
	unsigned char hash[HASH_LEN];
	char username[USERNAME_MAX + 1];
};

struct buffer {
	char *data;
	size_t len;
	size_t cap;
};

static mosquitto_plugin_id_t *plg_id = NULL;
static char *journal_path = NULL;
static int journal_fd = -1;
static off_t journal_size = 0; /* bytes known to be good (written and synced) */
static size_t journal_lines = 0;

static struct device **buckets = NULL;
static size_t bucket_count = 0;
static size_t device_count = 0;

/* Adaptors, in a hash table of their own (few, but looked up at every publish of theirs). */
static struct adaptor **adaptor_buckets = NULL;
static size_t adaptor_bucket_count = 0;
static size_t adaptor_count = 0;
static size_t assigned_count = 0; /* devices with an adaptor */

/* Device types: every type seen (configured or in the journal); a device holds an index. Only
 * configured types are accepted by createDevices. */
static char *types[MAX_TYPES];
static bool type_allowed[MAX_TYPES];
static size_t type_count = 0;

/* listDevices pages through a sorted snapshot, rebuilt after devices were created or deleted. */
static struct device **sorted = NULL;
static bool sorted_valid = false;

/* Journal lines of the control message being handled, written and synced at its end. */
static struct buffer pending = {NULL, 0, 0};

/* ---------------------------------------------------------------------------------------------------
 * Small helpers
 * ------------------------------------------------------------------------------------------------- */

static bool valid_username(const char *s)
{
	size_t n = 0;
	if(s == NULL) return false;
	for(; s[n]; n++){
		char c = s[n];
		if(n >= USERNAME_MAX) return false;
		if(!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-')){
			return false;
		}
	}
	return n > 0;
}

/* Is this username in the adaptors' namespace (whether or not a valid one)? */
static bool is_adaptor_username(const char *s)
{
	return s != NULL && !strncmp(s, ADAPTOR_PREFIX, ADAPTOR_PREFIX_LEN);
}

static bool valid_adaptor_username(const char *s)
{
	return is_adaptor_username(s) && valid_username(s + ADAPTOR_PREFIX_LEN) && strlen(s) <= USERNAME_MAX;
}

static bool valid_type_name(const char *s)
{
	size_t n = 0;
	if(s == NULL) return false;
	for(; s[n]; n++){
		char c = s[n];
		if(n >= TYPE_MAX) return false;
		if(!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_')) return false;
	}
	return n > 0;
}

/* The index of a device type, added to the table if new; -1 if invalid or the table is full. */
static int type_index(const char *name, bool add)
{
	size_t i;
	for(i = 0; i < type_count; i++){
		if(!strcmp(types[i], name)) return (int)i;
	}
	if(!add || !valid_type_name(name) || type_count >= MAX_TYPES) return -1;
	types[type_count] = mosquitto_strdup(name);
	if(types[type_count] == NULL) return -1;
	type_allowed[type_count] = false;
	return (int)type_count++;
}

static const char b64_alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static int b64_value(char c)
{
	if(c >= 'A' && c <= 'Z') return c - 'A';
	if(c >= 'a' && c <= 'z') return c - 'a' + 26;
	if(c >= '0' && c <= '9') return c - '0' + 52;
	if(c == '+') return 62;
	if(c == '/') return 63;
	return -1;
}

/* Decode padded standard base64 that must hold exactly out_len bytes; 0 on success. */
static int b64_decode_exact(const char *in, unsigned char *out, size_t out_len)
{
	size_t in_len, i, o = 0;

	if(in == NULL) return -1;
	in_len = strlen(in);
	if(in_len != 4 * ((out_len + 2) / 3)) return -1;
	for(i = 0; i < in_len; i += 4){
		int v[4], k, pad = 0, bytes;
		uint32_t triple;
		for(k = 0; k < 4; k++){
			char c = in[i + (size_t)k];
			if(c == '='){
				if(i + 4 != in_len || k < 2) return -1;
				v[k] = 0;
				pad++;
			}else{
				if(pad) return -1;
				v[k] = b64_value(c);
				if(v[k] < 0) return -1;
			}
		}
		triple = ((uint32_t)v[0] << 18) | ((uint32_t)v[1] << 12) | ((uint32_t)v[2] << 6) | (uint32_t)v[3];
		bytes = 3 - pad;
		for(k = 0; k < bytes; k++){
			if(o >= out_len) return -1;
			out[o++] = (unsigned char)((triple >> (16 - 8 * k)) & 0xff);
		}
	}
	return o == out_len ? 0 : -1;
}

/* Encode `len` bytes as padded base64 into out (at least 4*ceil(len/3)+1 bytes). */
static void b64_encode(const unsigned char *in, size_t len, char *out)
{
	size_t i, o = 0;
	for(i = 0; i < len; i += 3){
		uint32_t triple = (uint32_t)in[i] << 16;
		if(i + 1 < len) triple |= (uint32_t)in[i + 1] << 8;
		if(i + 2 < len) triple |= in[i + 2];
		out[o++] = b64_alphabet[(triple >> 18) & 0x3f];
		out[o++] = b64_alphabet[(triple >> 12) & 0x3f];
		out[o++] = i + 1 < len ? b64_alphabet[(triple >> 6) & 0x3f] : '=';
		out[o++] = i + 2 < len ? b64_alphabet[triple & 0x3f] : '=';
	}
	out[o] = '\0';
}

static int buffer_append(struct buffer *b, const char *s, size_t n)
{
	if(b->len + n + 1 > b->cap){
		size_t cap = b->cap ? b->cap : 4096;
		char *data;
		while(cap < b->len + n + 1) cap *= 2;
		data = realloc(b->data, cap);
		if(data == NULL) return -1;
		b->data = data;
		b->cap = cap;
	}
	memcpy(b->data + b->len, s, n);
	b->len += n;
	b->data[b->len] = '\0';
	return 0;
}

static int write_all(int fd, const char *data, size_t len)
{
	while(len > 0){
		ssize_t n = write(fd, data, len);
		if(n < 0){
			if(errno == EINTR) continue;
			return -1;
		}
		data += n;
		len -= (size_t)n;
	}
	return 0;
}

/* ---------------------------------------------------------------------------------------------------
 * The device table
 * ------------------------------------------------------------------------------------------------- */

static uint32_t fnv1a(const char *s)
{
	uint32_t h = 2166136261u;
	for(; *s; s++){
		h ^= (unsigned char)*s;
		h *= 16777619u;
	}
	return h;
}

static struct device *device_find(const char *username)
{
	uint32_t h;
	struct device *d;
	if(username == NULL || bucket_count == 0) return NULL;
	h = fnv1a(username);
	for(d = buckets[h & (bucket_count - 1)]; d; d = d->next){
		if(d->hashv == h && !strcmp(d->username, username)) return d;
	}
	return NULL;
}

static int table_grow(void)
{
	size_t n = bucket_count ? bucket_count * 2 : 1024, i;
	struct device **nb = mosquitto_calloc(n, sizeof(*nb));
	if(nb == NULL) return -1;
	for(i = 0; i < bucket_count; i++){
		struct device *d = buckets[i], *next;
		for(; d; d = next){
			next = d->next;
			d->next = nb[d->hashv & (n - 1)];
			nb[d->hashv & (n - 1)] = d;
		}
	}
	mosquitto_free(buckets);
	buckets = nb;
	bucket_count = n;
	return 0;
}

/* A new device (the username must be valid and unknown); NULL on out of memory. */
static struct device *device_add(const char *username, int type, const unsigned char *salt,
		const unsigned char *hash, bool disabled)
{
	struct device *d;
	size_t b;

	if(device_count >= bucket_count && table_grow()) return NULL;
	d = mosquitto_calloc(1, sizeof(*d));
	if(d == NULL) return NULL;
	strcpy(d->username, username); /* length checked by valid_username() */
	d->hashv = fnv1a(username);
	d->type = (uint16_t)type;
	d->disabled = disabled;
	memcpy(d->salt, salt, SALT_LEN);
	memcpy(d->hash, hash, HASH_LEN);
	b = d->hashv & (bucket_count - 1);
	d->next = buckets[b];
	buckets[b] = d;
	device_count++;
	sorted_valid = false;
	return d;
}

static void device_remove(const char *username)
{
	uint32_t h;
	struct device **p, *d;
	if(bucket_count == 0) return;
	h = fnv1a(username);
	for(p = &buckets[h & (bucket_count - 1)]; (d = *p) != NULL; p = &d->next){
		if(d->hashv == h && !strcmp(d->username, username)){
			*p = d->next;
			if(d->adaptor){
				d->adaptor->device_count--;
				assigned_count--;
			}
			mosquitto_free(d);
			device_count--;
			sorted_valid = false;
			return;
		}
	}
}

/* Give the device to the adaptor (taking it from the one it had, if any). */
static void device_assign(struct device *d, struct adaptor *a)
{
	if(d->adaptor == a) return;
	if(d->adaptor){
		d->adaptor->device_count--;
	}else{
		assigned_count++;
	}
	d->adaptor = a;
	a->device_count++;
}

static void device_unassign(struct device *d)
{
	if(d->adaptor == NULL) return;
	d->adaptor->device_count--;
	d->adaptor = NULL;
	assigned_count--;
}

/* ---------------------------------------------------------------------------------------------------
 * The adaptor table
 * ------------------------------------------------------------------------------------------------- */

static struct adaptor *adaptor_find(const char *username)
{
	uint32_t h;
	struct adaptor *a;
	if(username == NULL || adaptor_bucket_count == 0) return NULL;
	h = fnv1a(username);
	for(a = adaptor_buckets[h & (adaptor_bucket_count - 1)]; a; a = a->next){
		if(a->hashv == h && !strcmp(a->username, username)) return a;
	}
	return NULL;
}

static int adaptor_table_grow(void)
{
	size_t n = adaptor_bucket_count ? adaptor_bucket_count * 2 : 64, i;
	struct adaptor **nb = mosquitto_calloc(n, sizeof(*nb));
	if(nb == NULL) return -1;
	for(i = 0; i < adaptor_bucket_count; i++){
		struct adaptor *a = adaptor_buckets[i], *next;
		for(; a; a = next){
			next = a->next;
			a->next = nb[a->hashv & (n - 1)];
			nb[a->hashv & (n - 1)] = a;
		}
	}
	mosquitto_free(adaptor_buckets);
	adaptor_buckets = nb;
	adaptor_bucket_count = n;
	return 0;
}

/* A new adaptor (the username must be a valid adaptor username and unknown); NULL on out of memory. */
static struct adaptor *adaptor_add(const char *username, const unsigned char *salt, const unsigned char *hash,
		bool disabled)
{
	struct adaptor *a;
	size_t b;

	if(adaptor_count >= adaptor_bucket_count && adaptor_table_grow()) return NULL;
	a = mosquitto_calloc(1, sizeof(*a));
	if(a == NULL) return NULL;
	strcpy(a->username, username); /* length checked by valid_adaptor_username() */
	a->hashv = fnv1a(username);
	a->disabled = disabled;
	memcpy(a->salt, salt, SALT_LEN);
	memcpy(a->hash, hash, HASH_LEN);
	b = a->hashv & (adaptor_bucket_count - 1);
	a->next = adaptor_buckets[b];
	adaptor_buckets[b] = a;
	adaptor_count++;
	return a;
}

/* Remove the adaptor; its devices are unassigned first (a scan of the device table: deleting an adaptor
 * is rare, publishing is not, so the device holds the link, not the adaptor). */
static void adaptor_remove(struct adaptor *a)
{
	struct adaptor **p;
	size_t i;

	for(i = 0; i < bucket_count && a->device_count > 0; i++){
		struct device *d;
		for(d = buckets[i]; d; d = d->next){
			if(d->adaptor == a) device_unassign(d);
		}
	}
	for(p = &adaptor_buckets[a->hashv & (adaptor_bucket_count - 1)]; *p; p = &(*p)->next){
		if(*p == a){
			*p = a->next;
			mosquitto_free(a);
			adaptor_count--;
			return;
		}
	}
}

static void table_free(void)
{
	size_t i;
	for(i = 0; i < bucket_count; i++){
		struct device *d = buckets[i], *next;
		for(; d; d = next){
			next = d->next;
			mosquitto_free(d);
		}
	}
	mosquitto_free(buckets);
	buckets = NULL;
	bucket_count = 0;
	device_count = 0;
	assigned_count = 0;
	for(i = 0; i < adaptor_bucket_count; i++){
		struct adaptor *a = adaptor_buckets[i], *next;
		for(; a; a = next){
			next = a->next;
			mosquitto_free(a);
		}
	}
	mosquitto_free(adaptor_buckets);
	adaptor_buckets = NULL;
	adaptor_bucket_count = 0;
	adaptor_count = 0;
	free(sorted);
	sorted = NULL;
	sorted_valid = false;
}

static int cmp_devices(const void *a, const void *b)
{
	return strcmp((*(struct device *const *)a)->username, (*(struct device *const *)b)->username);
}

static int sorted_rebuild(void)
{
	size_t i, n = 0;
	struct device **s;

	if(sorted_valid) return 0;
	s = realloc(sorted, (device_count ? device_count : 1) * sizeof(*s));
	if(s == NULL) return -1;
	sorted = s;
	for(i = 0; i < bucket_count; i++){
		struct device *d;
		for(d = buckets[i]; d; d = d->next) sorted[n++] = d;
	}
	qsort(sorted, n, sizeof(*sorted), cmp_devices);
	sorted_valid = true;
	return 0;
}

/* ---------------------------------------------------------------------------------------------------
 * The journal
 * ------------------------------------------------------------------------------------------------- */

/* One journal line for a device's full state ("C ..."), into out (LINE_MAX_LEN bytes). */
static int line_create(const struct device *d, char *out)
{
	char salt[SALT_B64_LEN + 1], hash[HASH_B64_LEN + 1];
	b64_encode(d->salt, SALT_LEN, salt);
	b64_encode(d->hash, HASH_LEN, hash);
	return snprintf(out, LINE_MAX_LEN, "C %s %s %s %s %d\n", d->username, types[d->type], salt, hash,
			d->disabled ? 1 : 0);
}

/* One journal line for an adaptor's full state ("A ..."), into out (LINE_MAX_LEN bytes). */
static int line_adaptor(const struct adaptor *a, char *out)
{
	char salt[SALT_B64_LEN + 1], hash[HASH_B64_LEN + 1];
	b64_encode(a->salt, SALT_LEN, salt);
	b64_encode(a->hash, HASH_LEN, hash);
	return snprintf(out, LINE_MAX_LEN, "A %s %s %s %d\n", a->username, salt, hash, a->disabled ? 1 : 0);
}

/* A journal line of the control message being handled, written and synced with the others at its end. */
__attribute__((format(printf, 1, 2)))
static int pending_printf(const char *fmt, ...)
{
	char line[LINE_MAX_LEN];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	if(n < 0 || (size_t)n >= sizeof(line)) return -1;
	return buffer_append(&pending, line, (size_t)n);
}

static int pending_adaptor_line(char op, const struct adaptor *a)
{
	char line[LINE_MAX_LEN];
	int n;

	if(op == 'A'){
		n = line_adaptor(a, line);
		if(n < 0 || n >= LINE_MAX_LEN) return -1;
		return buffer_append(&pending, line, (size_t)n);
	}
	if(op == 'P'){
		char salt[SALT_B64_LEN + 1], hash[HASH_B64_LEN + 1];
		b64_encode(a->salt, SALT_LEN, salt);
		b64_encode(a->hash, HASH_LEN, hash);
		return pending_printf("P %s %s %s\n", a->username, salt, hash);
	}
	return pending_printf("%c %s\n", op, a->username);
}

/* The number of lines a compacted journal has (besides its header). */
static size_t live_lines(void)
{
	return device_count + adaptor_count + assigned_count;
}

static int pending_line(const char *fmt_op, const struct device *d)
{
	char line[LINE_MAX_LEN];
	int n;

	if(fmt_op[0] == 'C'){
		n = line_create(d, line);
	}else if(fmt_op[0] == 'P'){
		char salt[SALT_B64_LEN + 1], hash[HASH_B64_LEN + 1];
		b64_encode(d->salt, SALT_LEN, salt);
		b64_encode(d->hash, HASH_LEN, hash);
		n = snprintf(line, sizeof(line), "P %s %s %s\n", d->username, salt, hash);
	}else{
		n = snprintf(line, sizeof(line), "%c %s\n", fmt_op[0], d->username);
	}
	if(n < 0 || (size_t)n >= sizeof(line)) return -1;
	return buffer_append(&pending, line, (size_t)n);
}

static int fsync_dir_of(const char *path)
{
	char dir[4096];
	const char *slash = strrchr(path, '/');
	size_t n;
	int fd, rc;

	if(slash == NULL){
		strcpy(dir, ".");
	}else{
		n = (size_t)(slash - path);
		if(n == 0) n = 1;
		if(n >= sizeof(dir)) return -1;
		memcpy(dir, path, n);
		dir[n] = '\0';
	}
	fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if(fd < 0) return -1;
	rc = fsync(fd);
	close(fd);
	return rc;
}

static int journal_open_append(void)
{
	struct stat st;
	int fd = open(journal_path, O_WRONLY | O_APPEND | O_CLOEXEC);
	if(fd < 0) return -1;
	if(fstat(fd, &st)){
		close(fd);
		return -1;
	}
	if(journal_fd >= 0) close(journal_fd);
	journal_fd = fd;
	journal_size = st.st_size;
	return 0;
}

/* Rewrite the journal from the tables: header, one line per adaptor, one per device, one per assignment
 * (adaptors and devices before the assignments that name them), into a tmp file that replaces the
 * journal once it is on disk. */
static int journal_compact(void)
{
	char tmp[4096], line[LINE_MAX_LEN];
	struct buffer out = {NULL, 0, 0};
	size_t i, lines = 1;
	int fd, n;

	n = snprintf(tmp, sizeof(tmp), "%s.tmp", journal_path);
	if(n < 0 || (size_t)n >= sizeof(tmp)) return -1;
	if(buffer_append(&out, JOURNAL_HEADER "\n", strlen(JOURNAL_HEADER) + 1)) goto error;
	for(i = 0; i < adaptor_bucket_count; i++){
		struct adaptor *a;
		for(a = adaptor_buckets[i]; a; a = a->next){
			n = line_adaptor(a, line);
			if(n < 0 || n >= LINE_MAX_LEN || buffer_append(&out, line, (size_t)n)) goto error;
			lines++;
		}
	}
	for(i = 0; i < bucket_count; i++){
		struct device *d;
		for(d = buckets[i]; d; d = d->next){
			n = line_create(d, line);
			if(n < 0 || n >= LINE_MAX_LEN || buffer_append(&out, line, (size_t)n)) goto error;
			lines++;
		}
	}
	for(i = 0; i < bucket_count; i++){
		struct device *d;
		for(d = buckets[i]; d; d = d->next){
			if(d->adaptor == NULL) continue;
			n = snprintf(line, sizeof(line), "M %s %s\n", d->username, d->adaptor->username);
			if(n < 0 || n >= LINE_MAX_LEN || buffer_append(&out, line, (size_t)n)) goto error;
			lines++;
		}
	}
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if(fd < 0) goto error;
	if(write_all(fd, out.data, out.len) || fsync(fd)){
		close(fd);
		unlink(tmp);
		goto error;
	}
	close(fd);
	if(rename(tmp, journal_path)){
		unlink(tmp);
		goto error;
	}
	fsync_dir_of(journal_path);
	free(out.data);
	journal_lines = lines;
	if(journal_open_append()){
		mosquitto_log_printf(MOSQ_LOG_ERR, PLUGIN_NAME ": cannot reopen %s: %s", journal_path, strerror(errno));
		return -1;
	}
	mosquitto_log_printf(MOSQ_LOG_INFO, PLUGIN_NAME ": journal compacted to %lu device(s), %lu adaptor(s), "
			"%lu assignment(s)", (unsigned long)device_count, (unsigned long)adaptor_count,
			(unsigned long)assigned_count);
	return 0;
error:
	mosquitto_log_printf(MOSQ_LOG_ERR, PLUGIN_NAME ": compacting %s failed: %s", journal_path, strerror(errno));
	free(out.data);
	return -1;
}

static size_t count_lines(const char *s, size_t len)
{
	size_t i, n = 0;
	for(i = 0; i < len; i++){
		if(s[i] == '\n') n++;
	}
	return n;
}

/* Write the pending lines and fsync them. On failure the file is cut back to its last good size and
 * rewritten from the table (which already holds the changes); -1 if that fails too. */
static int journal_flush(void)
{
	size_t lines;

	if(pending.len == 0) return 0;
	lines = count_lines(pending.data, pending.len);
	if(journal_fd >= 0 && !write_all(journal_fd, pending.data, pending.len) && !fdatasync(journal_fd)){
		journal_size += (off_t)pending.len;
		journal_lines += lines;
		pending.len = 0;
		if(journal_lines > 2 * live_lines() + COMPACT_SLACK){
			journal_compact(); /* the journal is valid either way */
		}
		return 0;
	}
	mosquitto_log_printf(MOSQ_LOG_ERR, PLUGIN_NAME ": writing %s failed (%s); rewriting it whole",
			journal_path, strerror(errno));
	if(journal_fd >= 0 && ftruncate(journal_fd, journal_size)){
		mosquitto_log_printf(MOSQ_LOG_ERR, PLUGIN_NAME ": cannot cut %s back: %s", journal_path, strerror(errno));
	}
	pending.len = 0;
	return journal_compact();
}

/* Apply one journal line about an adaptor (A, P, D, E, X; tok[1] a valid adaptor username). */
static int journal_apply_adaptor(char **tok, int ntok, size_t lineno, unsigned long *inconsistent)
{
	unsigned char salt[SALT_LEN], hash[HASH_LEN];
	struct adaptor *a = adaptor_find(tok[1]);

	switch(tok[0][0]){
		case 'A':
			if(ntok != 5 || b64_decode_exact(tok[2], salt, SALT_LEN) || b64_decode_exact(tok[3], hash, HASH_LEN)
					|| (strcmp(tok[4], "0") && strcmp(tok[4], "1"))){
				return -1;
			}
			if(a){
				(*inconsistent)++;
				memcpy(a->salt, salt, SALT_LEN);
				memcpy(a->hash, hash, HASH_LEN);
				a->disabled = tok[4][0] == '1';
			}else if(adaptor_add(tok[1], salt, hash, tok[4][0] == '1') == NULL){
				mosquitto_log_printf(MOSQ_LOG_ERR, PLUGIN_NAME ": out of memory at journal line %lu",
						(unsigned long)lineno);
				return -2;
			}
			return 0;
		case 'P':
			if(ntok != 4 || b64_decode_exact(tok[2], salt, SALT_LEN) || b64_decode_exact(tok[3], hash, HASH_LEN)){
				return -1;
			}
			if(a){
				memcpy(a->salt, salt, SALT_LEN);
				memcpy(a->hash, hash, HASH_LEN);
			}else{
				(*inconsistent)++;
			}
			return 0;
		case 'D':
		case 'E':
			if(ntok != 2) return -1;
			if(a){
				a->disabled = tok[0][0] == 'D';
			}else{
				(*inconsistent)++;
			}
			return 0;
		case 'X':
			if(ntok != 2) return -1;
			if(a){
				adaptor_remove(a);
			}else{
				(*inconsistent)++;
			}
			return 0;
		default:
			return -1;
	}
}

/* Apply one journal line (without its newline) to the tables; -1 if malformed. */
static int journal_apply(char *line, size_t lineno, unsigned long *inconsistent)
{
	char *tok[7], *save = NULL, *t;
	int ntok = 0, type;
	unsigned char salt[SALT_LEN], hash[HASH_LEN];
	struct device *d;
	struct adaptor *a;

	for(t = strtok_r(line, " ", &save); t; t = strtok_r(NULL, " ", &save)){
		if(ntok == 7) return -1;
		tok[ntok++] = t;
	}
	if(ntok < 2 || strlen(tok[0]) != 1) return -1;
	if(is_adaptor_username(tok[1])){
		if(!valid_adaptor_username(tok[1])) return -1;
		return journal_apply_adaptor(tok, ntok, lineno, inconsistent);
	}
	if(!valid_username(tok[1])) return -1;
	d = device_find(tok[1]);
	switch(tok[0][0]){
		case 'C':
			if(ntok != 6 || b64_decode_exact(tok[3], salt, SALT_LEN) || b64_decode_exact(tok[4], hash, HASH_LEN)
					|| (strcmp(tok[5], "0") && strcmp(tok[5], "1"))){
				return -1;
			}
			type = type_index(tok[2], true);
			if(type < 0) return -1;
			if(d){
				(*inconsistent)++;
				d->type = (uint16_t)type;
				memcpy(d->salt, salt, SALT_LEN);
				memcpy(d->hash, hash, HASH_LEN);
				d->disabled = tok[5][0] == '1';
			}else if(device_add(tok[1], type, salt, hash, tok[5][0] == '1') == NULL){
				mosquitto_log_printf(MOSQ_LOG_ERR, PLUGIN_NAME ": out of memory at journal line %lu",
						(unsigned long)lineno);
				return -2;
			}
			return 0;
		case 'P':
			if(ntok != 4 || b64_decode_exact(tok[2], salt, SALT_LEN) || b64_decode_exact(tok[3], hash, HASH_LEN)){
				return -1;
			}
			if(d){
				memcpy(d->salt, salt, SALT_LEN);
				memcpy(d->hash, hash, HASH_LEN);
			}else{
				(*inconsistent)++;
			}
			return 0;
		case 'D':
		case 'E':
			if(ntok != 2) return -1;
			if(d){
				d->disabled = tok[0][0] == 'D';
			}else{
				(*inconsistent)++;
			}
			return 0;
		case 'X':
			if(ntok != 2) return -1;
			if(d){
				device_remove(tok[1]);
			}else{
				(*inconsistent)++;
			}
			return 0;
		case 'M':
			if(ntok != 3 || !valid_adaptor_username(tok[2])) return -1;
			a = adaptor_find(tok[2]);
			if(d && a){
				device_assign(d, a);
			}else{
				(*inconsistent)++;
			}
			return 0;
		case 'U':
			if(ntok != 2) return -1;
			if(d && d->adaptor){
				device_unassign(d);
			}else{
				(*inconsistent)++;
			}
			return 0;
		default:
			return -1;
	}
}

static int journal_create(void)
{
	int fd = open(journal_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if(fd < 0 || write_all(fd, JOURNAL_HEADER "\n", strlen(JOURNAL_HEADER) + 1) || fsync(fd)){
		mosquitto_log_printf(MOSQ_LOG_ERR, PLUGIN_NAME ": cannot create %s: %s", journal_path, strerror(errno));
		if(fd >= 0) close(fd);
		return -1;
	}
	close(fd);
	fsync_dir_of(journal_path);
	journal_lines = 1;
	return journal_open_append();
}

static int read_file(int fd, char **out, size_t *out_len)
{
	struct stat st;
	size_t len, got = 0;
	char *data;

	if(fstat(fd, &st)) return -1;
	len = (size_t)st.st_size;
	data = malloc(len + 1);
	if(data == NULL) return -1;
	while(got < len){
		ssize_t n = read(fd, data + got, len - got);
		if(n < 0 && errno == EINTR) continue;
		if(n <= 0){
			free(data);
			return -1;
		}
		got += (size_t)n;
	}
	data[len] = '\0';
	*out = data;
	*out_len = len;
	return 0;
}

/* Replay the journal into the table (creating the file if missing). */
static int journal_load(void)
{
	char *data = NULL, line[LINE_MAX_LEN];
	size_t len = 0, pos, header_len = strlen(JOURNAL_HEADER), lineno = 1, good_end;
	unsigned long inconsistent = 0;
	int fd, rc;

	fd = open(journal_path, O_RDWR | O_CLOEXEC);
	if(fd < 0){
		if(errno == ENOENT) return journal_create();
		mosquitto_log_printf(MOSQ_LOG_ERR, PLUGIN_NAME ": cannot open %s: %s", journal_path, strerror(errno));
		return -1;
	}
	if(read_file(fd, &data, &len)){
		mosquitto_log_printf(MOSQ_LOG_ERR, PLUGIN_NAME ": cannot read %s: %s", journal_path, strerror(errno));
		close(fd);
		return -1;
	}
	if(len <= header_len && !memcmp(data, JOURNAL_HEADER, len)){
		/* Empty, or torn while it was being created: nothing was ever recorded in it. */
		close(fd);
		free(data);
		return journal_create();
	}
	if(len < header_len + 1 || memcmp(data, JOURNAL_HEADER "\n", header_len + 1)){
		mosquitto_log_printf(MOSQ_LOG_ERR, PLUGIN_NAME ": %s is not a device journal (first line is not \"%s\")",
				journal_path, JOURNAL_HEADER);
		close(fd);
		free(data);
		return -1;
	}
	pos = good_end = header_len + 1;
	journal_lines = 1;
	while(pos < len){
		char *nl = memchr(data + pos, '\n', len - pos);
		size_t line_len;
		bool last;

		lineno++;
		if(nl == NULL){
			mosquitto_log_printf(MOSQ_LOG_WARNING,
					PLUGIN_NAME ": %s: line %lu is incomplete (torn write, the broker stopped while writing it): "
					"skipped, and cut off the file", journal_path, (unsigned long)lineno);
			break;
		}
		line_len = (size_t)(nl - (data + pos));
		last = (size_t)(nl - data) + 1 == len;
		rc = -1;
		if(line_len < sizeof(line) && memchr(data + pos, '\0', line_len) == NULL){
			memcpy(line, data + pos, line_len);
			line[line_len] = '\0';
			rc = journal_apply(line, lineno, &inconsistent);
		}
		if(rc == -2){
			close(fd);
			free(data);
			return -1;
		}
		if(rc != 0){
			if(last){
				mosquitto_log_printf(MOSQ_LOG_WARNING,
						PLUGIN_NAME ": %s: last line %lu is malformed (torn write): skipped, and cut off the file",
						journal_path, (unsigned long)lineno);
				break;
			}
			mosquitto_log_printf(MOSQ_LOG_ERR,
					PLUGIN_NAME ": %s: line %lu is malformed; refusing to start rather than lose a change "
					"(fix or remove that line)", journal_path, (unsigned long)lineno);
			close(fd);
			free(data);
			return -1;
		}
		journal_lines++;
		pos = (size_t)(nl - data) + 1;
		good_end = pos;
	}
	free(data);
	if(good_end < len){
		if(ftruncate(fd, (off_t)good_end) || fsync(fd)){
			mosquitto_log_printf(MOSQ_LOG_ERR, PLUGIN_NAME ": cannot cut off the torn end of %s: %s",
					journal_path, strerror(errno));
			close(fd);
			return -1;
		}
	}
	close(fd);
	if(inconsistent){
		mosquitto_log_printf(MOSQ_LOG_WARNING, PLUGIN_NAME ": %s: %lu line(s) about devices or adaptors in an "
				"unexpected state (created twice, or changed while absent); applied as far as possible",
				journal_path, inconsistent);
	}
	if(journal_open_append()){
		mosquitto_log_printf(MOSQ_LOG_ERR, PLUGIN_NAME ": cannot open %s: %s", journal_path, strerror(errno));
		return -1;
	}
	mosquitto_log_printf(MOSQ_LOG_INFO, PLUGIN_NAME ": %lu device account(s), %lu adaptor(s) and %lu "
			"assignment(s) loaded from %s (%lu journal lines)", (unsigned long)device_count,
			(unsigned long)adaptor_count, (unsigned long)assigned_count, journal_path,
			(unsigned long)journal_lines);
	if(journal_lines > 2 * live_lines() + COMPACT_SLACK) journal_compact();
	return 0;
}

/* ---------------------------------------------------------------------------------------------------
 * Authentication and access control
 * ------------------------------------------------------------------------------------------------- */

static bool password_matches(const unsigned char *salt, const unsigned char *hash, const char *password)
{
	unsigned char digest[EVP_MAX_MD_SIZE];
	unsigned int digest_len = 0;
	EVP_MD_CTX *ctx;
	bool ok;

	ctx = EVP_MD_CTX_new();
	if(ctx == NULL) return false;
	ok = EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) == 1
		&& EVP_DigestUpdate(ctx, salt, SALT_LEN) == 1
		&& EVP_DigestUpdate(ctx, password, strlen(password)) == 1
		&& EVP_DigestFinal_ex(ctx, digest, &digest_len) == 1
		&& digest_len == HASH_LEN;
	EVP_MD_CTX_free(ctx);
	return ok && CRYPTO_memcmp(digest, hash, HASH_LEN) == 0;
}

/* An adaptor's client id: its username, or its username + "." + at least one more character. Adaptor
 * names cannot hold a ".", so no other adaptor (and no device) can use these client ids. */
static bool adaptor_client_id(const struct adaptor *a, const char *client_id)
{
	size_t n = strlen(a->username);
	if(client_id == NULL || strncmp(client_id, a->username, n)) return false;
	return client_id[n] == '\0' || (client_id[n] == '.' && client_id[n + 1] != '\0');
}

static int basic_auth_callback(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	const struct device *d;
	const struct adaptor *a;
	const char *client_id;

	UNUSED(event);
	UNUSED(userdata);

	if(is_adaptor_username(ed->username)){
		a = adaptor_find(ed->username);
		if(a == NULL) return MOSQ_ERR_PLUGIN_DEFER;
		/* Bound to a client id prefix: nobody else can take over an adaptor's sessions. */
		if(!adaptor_client_id(a, mosquitto_client_id(ed->client))) return MOSQ_ERR_AUTH;
		if(a->disabled || ed->password == NULL) return MOSQ_ERR_AUTH;
		return password_matches(a->salt, a->hash, ed->password) ? MOSQ_ERR_SUCCESS : MOSQ_ERR_AUTH;
	}
	d = device_find(ed->username);
	if(d == NULL) return MOSQ_ERR_PLUGIN_DEFER;
	client_id = mosquitto_client_id(ed->client);
	/* The client id is bound to the device: nobody else can take over its session. */
	if(client_id == NULL || strcmp(client_id, d->username)) return MOSQ_ERR_AUTH;
	if(d->disabled || ed->password == NULL) return MOSQ_ERR_AUTH;
	return password_matches(d->salt, d->hash, ed->password) ? MOSQ_ERR_SUCCESS : MOSQ_ERR_AUTH;
}

/* Does topic equal "sc/v1/{type}/{username}/{kind}"? */
static bool is_device_topic(const char *topic, const struct device *d, const char *kind)
{
	const char *type = types[d->type];
	size_t n;

	if(strncmp(topic, "sc/v1/", 6)) return false;
	topic += 6;
	n = strlen(type);
	if(strncmp(topic, type, n) || topic[n] != '/') return false;
	topic += n + 1;
	n = strlen(d->username);
	if(strncmp(topic, d->username, n) || topic[n] != '/') return false;
	return !strcmp(topic + n + 1, kind);
}

/* The device of "sc/v1/{type}/{id}/{kind}" if it exists and is of that type (else NULL), and its kind. */
static struct device *topic_device(const char *topic, const char **kind)
{
	char id[USERNAME_MAX + 1];
	const char *type, *slash;
	struct device *d;
	size_t type_len, id_len;

	if(strncmp(topic, "sc/v1/", 6)) return NULL;
	type = topic + 6;
	slash = strchr(type, '/');
	if(slash == NULL) return NULL;
	type_len = (size_t)(slash - type);
	id_len = strcspn(slash + 1, "/");
	if(id_len == 0 || id_len > USERNAME_MAX || slash[1 + id_len] != '/') return NULL;
	*kind = slash + 1 + id_len + 1;
	if(strchr(*kind, '/')) return NULL;
	memcpy(id, slash + 1, id_len);
	id[id_len] = '\0';
	d = device_find(id);
	if(d == NULL || strlen(types[d->type]) != type_len || strncmp(types[d->type], type, type_len)) return NULL;
	return d;
}

/* Is the topic "sc/v1/{type}/{id}/{kind}" of an enabled device assigned to the adaptor, with kind one of
 * `kinds` (a NULL-terminated list)? One hash lookup. */
static bool adaptor_device_topic(const struct adaptor *a, const char *topic, const char *const *kinds)
{
	const char *kind = NULL;
	const struct device *d = topic_device(topic, &kind);

	if(d == NULL || d->adaptor != a || d->disabled) return false;
	for(; *kinds; kinds++){
		if(!strcmp(kind, *kinds)) return true;
	}
	return false;
}

/* $share/<the adaptor's username>/sc/v1/+/+/cmd: the group is named after the adaptor, so its
 * connections do not join a group with another account's subscribers (the broker gives each message to
 * one member of a group: it could pick a member that may not receive that command). */
static bool adaptor_shared_cmd(const struct adaptor *a, const char *topic)
{
	size_t n = strlen(a->username);
	if(strncmp(topic, "$share/", 7)) return false;
	topic += 7;
	return !strncmp(topic, a->username, n) && topic[n] == '/' && !strcmp(topic + n + 1, ADAPTOR_WILDCARD_CMD);
}

static int adaptor_acl_check(const struct adaptor *a, const struct mosquitto_evt_acl_check *ed)
{
	static const char *const uplink[] = {"telemetry", "event", "status", NULL};
	static const char *const downlink[] = {"cmd", NULL};

	if(ed->access == MOSQ_ACL_UNSUBSCRIBE) return MOSQ_ERR_SUCCESS;
	/* A disabled adaptor was disconnected when it was disabled; this only closes the gap until then. */
	if(ed->topic == NULL || a->disabled) return MOSQ_ERR_ACL_DENIED;
	switch(ed->access){
		case MOSQ_ACL_WRITE:
			return adaptor_device_topic(a, ed->topic, uplink) ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
		case MOSQ_ACL_SUBSCRIBE:
			/* The wildcard is only a filter: each message is checked again (READ) before delivery. */
			if(!strcmp(ed->topic, ADAPTOR_WILDCARD_CMD) || adaptor_shared_cmd(a, ed->topic)){
				return MOSQ_ERR_SUCCESS;
			}
			return adaptor_device_topic(a, ed->topic, downlink) ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
		case MOSQ_ACL_READ:
			return adaptor_device_topic(a, ed->topic, downlink) ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
		default:
			return MOSQ_ERR_ACL_DENIED;
	}
}

static int acl_check_callback(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	const struct device *d;
	const char *username = mosquitto_client_username(ed->client);

	UNUSED(event);
	UNUSED(userdata);

	if(is_adaptor_username(username)){
		const struct adaptor *a = adaptor_find(username);
		return a ? adaptor_acl_check(a, ed) : MOSQ_ERR_PLUGIN_DEFER;
	}
	d = device_find(username);
	if(d == NULL) return MOSQ_ERR_PLUGIN_DEFER;
	if(ed->access == MOSQ_ACL_UNSUBSCRIBE) return MOSQ_ERR_SUCCESS;
	/* A disabled device was disconnected when it was disabled; this only closes the gap until then. */
	if(ed->topic == NULL || d->disabled) return MOSQ_ERR_ACL_DENIED;
	switch(ed->access){
		case MOSQ_ACL_WRITE:
			if(is_device_topic(ed->topic, d, "telemetry") || is_device_topic(ed->topic, d, "event")
					|| is_device_topic(ed->topic, d, "status")){
				return MOSQ_ERR_SUCCESS;
			}
			return MOSQ_ERR_ACL_DENIED;
		case MOSQ_ACL_SUBSCRIBE:
		case MOSQ_ACL_READ:
			return is_device_topic(ed->topic, d, "cmd") ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
		default:
			return MOSQ_ERR_ACL_DENIED;
	}
}

/* ---------------------------------------------------------------------------------------------------
 * $CONTROL/sc-device-auth/v1
 * ------------------------------------------------------------------------------------------------- */

struct request {
	struct mosquitto *client;
	const char *admin_id;
	const char *admin_username;
	cJSON *responses;
	cJSON **changed; /* responses of commands that changed something, to fail if saving fails */
	size_t changed_count;
};

static cJSON *reply(struct request *req, const char *command, const char *error, const char *correlation)
{
	cJSON *r = cJSON_CreateObject();
	if(r == NULL) return NULL;
	cJSON_AddStringToObject(r, "command", command);
	if(error) cJSON_AddStringToObject(r, "error", error);
	if(correlation) cJSON_AddStringToObject(r, "correlationData", correlation);
	cJSON_AddItemToArray(req->responses, r);
	return r;
}

static const char *get_string(const cJSON *obj, const char *key)
{
	const cJSON *j = cJSON_GetObjectItemCaseSensitive(obj, key);
	return cJSON_IsString(j) ? j->valuestring : NULL;
}

static void note_changed(struct request *req, cJSON *response)
{
	if(response) req->changed[req->changed_count++] = response;
}

static void kick(const char *username)
{
	/* Without the will: a cut-off device must not get a last message out. */
	mosquitto_kick_client_by_username(username, false);
}

static void cmd_create_devices(struct request *req, const cJSON *cmd, const char *corr)
{
	const cJSON *devices = cJSON_GetObjectItemCaseSensitive(cmd, "devices"), *item;
	cJSON *r, *data, *errors;
	unsigned long created = 0, index = 0;
	bool journal_error = false;

	if(!cJSON_IsArray(devices)){
		reply(req, "createDevices", "Missing/invalid devices array", corr);
		return;
	}
	r = reply(req, "createDevices", NULL, corr);
	if(r == NULL) return;
	data = cJSON_AddObjectToObject(r, "data");
	errors = data ? cJSON_AddObjectToObject(data, "errors") : NULL;
	if(errors == NULL){
		cJSON_AddStringToObject(r, "error", "Internal error");
		return;
	}
	cJSON_ArrayForEach(item, devices){
		const char *username = get_string(item, "username");
		const char *type_name = get_string(item, "type");
		unsigned char salt[SALT_LEN], hash[HASH_LEN];
		char key[32];
		const char *error = NULL;
		int type = -1;
		struct device *d;

		index++;
		if(!valid_username(username)){
			snprintf(key, sizeof(key), "#%lu", index);
			cJSON_AddStringToObject(errors, key, "Invalid username");
			continue;
		}
		if(type_name) type = type_index(type_name, false);
		if(type < 0 || !type_allowed[type]){
			error = "Invalid type";
		}else if(b64_decode_exact(get_string(item, "salt"), salt, SALT_LEN)){
			error = "Invalid salt";
		}else if(b64_decode_exact(get_string(item, "hash"), hash, HASH_LEN)){
			error = "Invalid hash";
		}else if(device_find(username)){
			error = ERR_EXISTS;
		}
		if(error){
			cJSON_AddStringToObject(errors, username, error);
			continue;
		}
		d = device_add(username, type, salt, hash, false);
		if(d == NULL){
			cJSON_AddStringToObject(errors, username, "Internal error");
			continue;
		}
		if(pending_line("C", d)) journal_error = true;
		created++;
	}
	cJSON_AddNumberToObject(data, "created", (double)created);
	if(journal_error) cJSON_AddStringToObject(r, "error", "Internal error");
	if(created) note_changed(req, r);
	mosquitto_log_printf(MOSQ_LOG_INFO, PLUGIN_NAME ": %s/%s | createDevices | created=%lu refused=%lu",
			req->admin_id, req->admin_username, created, index - created);
}

/* The device a single-device command names; replies with the error and returns NULL if none. */
static struct device *named_device(struct request *req, const cJSON *cmd, const char *command, const char *corr,
		const char **username)
{
	struct device *d;
	*username = get_string(cmd, "username");
	if(*username == NULL){
		reply(req, command, "Invalid/missing username", corr);
		return NULL;
	}
	d = device_find(*username);
	if(d == NULL) reply(req, command, ERR_NOT_FOUND, corr);
	return d;
}

static void cmd_set_password(struct request *req, const cJSON *cmd, const char *corr)
{
	const char *username;
	unsigned char salt[SALT_LEN], hash[HASH_LEN];
	struct device *d = named_device(req, cmd, "setDevicePassword", corr, &username);
	cJSON *r;

	if(d == NULL) return;
	if(b64_decode_exact(get_string(cmd, "salt"), salt, SALT_LEN)
			|| b64_decode_exact(get_string(cmd, "hash"), hash, HASH_LEN)){
		reply(req, "setDevicePassword", "Invalid salt or hash", corr);
		return;
	}
	memcpy(d->salt, salt, SALT_LEN);
	memcpy(d->hash, hash, HASH_LEN);
	r = reply(req, "setDevicePassword", pending_line("P", d) ? "Internal error" : NULL, corr);
	note_changed(req, r);
	/* A session opened with the old password does not outlive it. */
	kick(d->username);
	mosquitto_log_printf(MOSQ_LOG_INFO, PLUGIN_NAME ": %s/%s | setDevicePassword | username=%s",
			req->admin_id, req->admin_username, d->username);
}

static void cmd_set_disabled(struct request *req, const cJSON *cmd, const char *corr, bool disabled)
{
	const char *command = disabled ? "disableDevice" : "enableDevice";
	const char *username;
	struct device *d = named_device(req, cmd, command, corr, &username);
	cJSON *r;

	if(d == NULL) return;
	d->disabled = disabled;
	r = reply(req, command, pending_line(disabled ? "D" : "E", d) ? "Internal error" : NULL, corr);
	note_changed(req, r);
	if(disabled) kick(d->username);
	mosquitto_log_printf(MOSQ_LOG_INFO, PLUGIN_NAME ": %s/%s | %s | username=%s",
			req->admin_id, req->admin_username, command, d->username);
}

static void cmd_delete(struct request *req, const cJSON *cmd, const char *corr)
{
	const char *username;
	struct device *d = named_device(req, cmd, "deleteDevice", corr, &username);
	cJSON *r;
	int rc;

	if(d == NULL) return;
	rc = pending_line("X", d);
	device_remove(username);
	r = reply(req, "deleteDevice", rc ? "Internal error" : NULL, corr);
	note_changed(req, r);
	kick(username);
	mosquitto_log_printf(MOSQ_LOG_INFO, PLUGIN_NAME ": %s/%s | deleteDevice | username=%s",
			req->admin_id, req->admin_username, username);
}

static void cmd_get(struct request *req, const cJSON *cmd, const char *corr)
{
	const char *username;
	struct device *d = named_device(req, cmd, "getDevice", corr, &username);
	cJSON *r, *data, *device;

	if(d == NULL) return;
	r = reply(req, "getDevice", NULL, corr);
	data = r ? cJSON_AddObjectToObject(r, "data") : NULL;
	device = data ? cJSON_AddObjectToObject(data, "device") : NULL;
	if(device == NULL) return;
	cJSON_AddStringToObject(device, "username", d->username);
	cJSON_AddStringToObject(device, "type", types[d->type]);
	cJSON_AddBoolToObject(device, "disabled", d->disabled);
	if(d->adaptor) cJSON_AddStringToObject(device, "adaptor", d->adaptor->username);
}

static void cmd_find(struct request *req, const cJSON *cmd, const char *corr)
{
	const cJSON *usernames = cJSON_GetObjectItemCaseSensitive(cmd, "usernames"), *item;
	cJSON *r, *data, *found;

	if(!cJSON_IsArray(usernames)){
		reply(req, "findDevices", "Missing/invalid usernames array", corr);
		return;
	}
	r = reply(req, "findDevices", NULL, corr);
	data = r ? cJSON_AddObjectToObject(r, "data") : NULL;
	found = data ? cJSON_AddArrayToObject(data, "found") : NULL;
	if(found == NULL) return;
	cJSON_ArrayForEach(item, usernames){
		if(cJSON_IsString(item) && device_find(item->valuestring)){
			cJSON_AddItemToArray(found, cJSON_CreateString(item->valuestring));
		}
	}
}

static void cmd_list(struct request *req, const cJSON *cmd, const char *corr)
{
	const cJSON *j_offset = cJSON_GetObjectItemCaseSensitive(cmd, "offset");
	const cJSON *j_count = cJSON_GetObjectItemCaseSensitive(cmd, "count");
	double offset = cJSON_IsNumber(j_offset) ? j_offset->valuedouble : 0;
	double count = cJSON_IsNumber(j_count) ? j_count->valuedouble : -1;
	cJSON *r, *data, *list;
	size_t i, start, end;

	if(offset < 0) offset = 0;
	if(count < 0 || count > LIST_MAX) count = LIST_MAX;
	if(sorted_rebuild()){
		reply(req, "listDevices", "Internal error", corr);
		return;
	}
	r = reply(req, "listDevices", NULL, corr);
	data = r ? cJSON_AddObjectToObject(r, "data") : NULL;
	list = data ? cJSON_AddArrayToObject(data, "devices") : NULL;
	if(list == NULL) return;
	cJSON_AddNumberToObject(data, "totalCount", (double)device_count);
	start = offset > (double)device_count ? device_count : (size_t)offset;
	end = start + (size_t)count > device_count ? device_count : start + (size_t)count;
	for(i = start; i < end; i++){
		cJSON_AddItemToArray(list, cJSON_CreateString(sorted[i]->username));
	}
}

/* ---- adaptors ---------------------------------------------------------------------------------------- */

/* The adaptor a command names; replies with the error and returns NULL if none. */
static struct adaptor *named_adaptor(struct request *req, const cJSON *cmd, const char *command, const char *corr)
{
	const char *username = get_string(cmd, "username");
	struct adaptor *a;
	if(username == NULL){
		reply(req, command, "Invalid/missing username", corr);
		return NULL;
	}
	a = adaptor_find(username);
	if(a == NULL) reply(req, command, ERR_NOT_FOUND, corr);
	return a;
}

static void cmd_create_adaptor(struct request *req, const cJSON *cmd, const char *corr)
{
	const char *username = get_string(cmd, "username");
	unsigned char salt[SALT_LEN], hash[HASH_LEN];
	struct adaptor *a;
	cJSON *r;

	if(!valid_adaptor_username(username)){
		reply(req, "createAdaptor", "Invalid/missing username", corr);
		return;
	}
	if(b64_decode_exact(get_string(cmd, "salt"), salt, SALT_LEN)
			|| b64_decode_exact(get_string(cmd, "hash"), hash, HASH_LEN)){
		reply(req, "createAdaptor", "Invalid salt or hash", corr);
		return;
	}
	if(adaptor_find(username)){
		reply(req, "createAdaptor", ERR_EXISTS, corr);
		return;
	}
	a = adaptor_add(username, salt, hash, false);
	if(a == NULL){
		reply(req, "createAdaptor", "Internal error", corr);
		return;
	}
	r = reply(req, "createAdaptor", pending_adaptor_line('A', a) ? "Internal error" : NULL, corr);
	note_changed(req, r);
	mosquitto_log_printf(MOSQ_LOG_INFO, PLUGIN_NAME ": %s/%s | createAdaptor | username=%s",
			req->admin_id, req->admin_username, a->username);
}

static void cmd_set_adaptor_password(struct request *req, const cJSON *cmd, const char *corr)
{
	unsigned char salt[SALT_LEN], hash[HASH_LEN];
	struct adaptor *a = named_adaptor(req, cmd, "setAdaptorPassword", corr);
	cJSON *r;

	if(a == NULL) return;
	if(b64_decode_exact(get_string(cmd, "salt"), salt, SALT_LEN)
			|| b64_decode_exact(get_string(cmd, "hash"), hash, HASH_LEN)){
		reply(req, "setAdaptorPassword", "Invalid salt or hash", corr);
		return;
	}
	memcpy(a->salt, salt, SALT_LEN);
	memcpy(a->hash, hash, HASH_LEN);
	r = reply(req, "setAdaptorPassword", pending_adaptor_line('P', a) ? "Internal error" : NULL, corr);
	note_changed(req, r);
	kick(a->username); /* every connection of the adaptor */
	mosquitto_log_printf(MOSQ_LOG_INFO, PLUGIN_NAME ": %s/%s | setAdaptorPassword | username=%s",
			req->admin_id, req->admin_username, a->username);
}

static void cmd_set_adaptor_disabled(struct request *req, const cJSON *cmd, const char *corr, bool disabled)
{
	const char *command = disabled ? "disableAdaptor" : "enableAdaptor";
	struct adaptor *a = named_adaptor(req, cmd, command, corr);
	cJSON *r;

	if(a == NULL) return;
	a->disabled = disabled;
	r = reply(req, command, pending_adaptor_line(disabled ? 'D' : 'E', a) ? "Internal error" : NULL, corr);
	note_changed(req, r);
	if(disabled) kick(a->username);
	mosquitto_log_printf(MOSQ_LOG_INFO, PLUGIN_NAME ": %s/%s | %s | username=%s",
			req->admin_id, req->admin_username, command, a->username);
}

static void cmd_delete_adaptor(struct request *req, const cJSON *cmd, const char *corr)
{
	char username[USERNAME_MAX + 1];
	struct adaptor *a = named_adaptor(req, cmd, "deleteAdaptor", corr);
	size_t devices;
	cJSON *r;
	int rc;

	if(a == NULL) return;
	/* The X line alone unassigns its devices on replay: no U line per device. */
	rc = pending_adaptor_line('X', a);
	strcpy(username, a->username);
	devices = a->device_count;
	adaptor_remove(a);
	r = reply(req, "deleteAdaptor", rc ? "Internal error" : NULL, corr);
	note_changed(req, r);
	kick(username);
	mosquitto_log_printf(MOSQ_LOG_INFO, PLUGIN_NAME ": %s/%s | deleteAdaptor | username=%s unassigned=%lu",
			req->admin_id, req->admin_username, username, (unsigned long)devices);
}

static void cmd_get_adaptor(struct request *req, const cJSON *cmd, const char *corr)
{
	struct adaptor *a = named_adaptor(req, cmd, "getAdaptor", corr);
	cJSON *r, *data, *adaptor;

	if(a == NULL) return;
	r = reply(req, "getAdaptor", NULL, corr);
	data = r ? cJSON_AddObjectToObject(r, "data") : NULL;
	adaptor = data ? cJSON_AddObjectToObject(data, "adaptor") : NULL;
	if(adaptor == NULL) return;
	cJSON_AddStringToObject(adaptor, "username", a->username);
	cJSON_AddBoolToObject(adaptor, "disabled", a->disabled);
	cJSON_AddNumberToObject(adaptor, "devices", (double)a->device_count);
}

static int cmp_adaptors(const void *x, const void *y)
{
	return strcmp((*(struct adaptor *const *)x)->username, (*(struct adaptor *const *)y)->username);
}

/* offset and count of a list command: offset >= 0, 0 <= count <= LIST_MAX (-1 or absent: LIST_MAX). */
static void list_window(const cJSON *cmd, size_t total, size_t *start, size_t *end)
{
	const cJSON *j_offset = cJSON_GetObjectItemCaseSensitive(cmd, "offset");
	const cJSON *j_count = cJSON_GetObjectItemCaseSensitive(cmd, "count");
	double offset = cJSON_IsNumber(j_offset) ? j_offset->valuedouble : 0;
	double count = cJSON_IsNumber(j_count) ? j_count->valuedouble : -1;

	if(!(offset >= 0)) offset = 0;
	if(!(count >= 0) || count > LIST_MAX) count = LIST_MAX;
	*start = offset > (double)total ? total : (size_t)offset;
	*end = *start + (size_t)count > total ? total : *start + (size_t)count;
}

static void cmd_list_adaptors(struct request *req, const cJSON *cmd, const char *corr)
{
	struct adaptor **all;
	cJSON *r, *data, *list;
	size_t i, n = 0, start, end;

	all = malloc((adaptor_count ? adaptor_count : 1) * sizeof(*all));
	if(all == NULL){
		reply(req, "listAdaptors", "Internal error", corr);
		return;
	}
	for(i = 0; i < adaptor_bucket_count; i++){
		struct adaptor *a;
		for(a = adaptor_buckets[i]; a; a = a->next) all[n++] = a;
	}
	qsort(all, n, sizeof(*all), cmp_adaptors);
	r = reply(req, "listAdaptors", NULL, corr);
	data = r ? cJSON_AddObjectToObject(r, "data") : NULL;
	list = data ? cJSON_AddArrayToObject(data, "adaptors") : NULL;
	if(list != NULL){
		cJSON_AddNumberToObject(data, "totalCount", (double)n);
		list_window(cmd, n, &start, &end);
		for(i = start; i < end; i++) cJSON_AddItemToArray(list, cJSON_CreateString(all[i]->username));
	}
	free(all);
}

/* The adaptor's devices, sorted, a page at a time: a pass over the sorted snapshot of all devices
 * (an admin's read, not on the publish path). */
static void cmd_list_adaptor_devices(struct request *req, const cJSON *cmd, const char *corr)
{
	struct adaptor *a = named_adaptor(req, cmd, "listAdaptorDevices", corr);
	cJSON *r, *data, *list;
	size_t i, seen = 0, start, end;

	if(a == NULL) return;
	if(sorted_rebuild()){
		reply(req, "listAdaptorDevices", "Internal error", corr);
		return;
	}
	r = reply(req, "listAdaptorDevices", NULL, corr);
	data = r ? cJSON_AddObjectToObject(r, "data") : NULL;
	list = data ? cJSON_AddArrayToObject(data, "devices") : NULL;
	if(list == NULL) return;
	cJSON_AddNumberToObject(data, "totalCount", (double)a->device_count);
	list_window(cmd, a->device_count, &start, &end);
	for(i = 0; i < device_count && seen < end; i++){
		if(sorted[i]->adaptor != a) continue;
		if(seen >= start) cJSON_AddItemToArray(list, cJSON_CreateString(sorted[i]->username));
		seen++;
	}
}

/* assignDevices / unassignDevices: {"username": <adaptor>, "devices": [ids]}, thousands per message,
 * one journal line per device changed. Per-device errors are under "errors" (key: the id, or
 * "#<position>" for an item that is not a valid id). */
static void cmd_assign(struct request *req, const cJSON *cmd, const char *corr, bool assign)
{
	const char *command = assign ? "assignDevices" : "unassignDevices";
	const cJSON *devices = cJSON_GetObjectItemCaseSensitive(cmd, "devices"), *item;
	struct adaptor *a = named_adaptor(req, cmd, command, corr);
	cJSON *r, *data, *errors, *moved = NULL;
	unsigned long changed = 0, unchanged = 0, index = 0, refused = 0;
	bool journal_error = false;

	if(a == NULL) return;
	if(!cJSON_IsArray(devices)){
		reply(req, command, "Missing/invalid devices array", corr);
		return;
	}
	r = reply(req, command, NULL, corr);
	data = r ? cJSON_AddObjectToObject(r, "data") : NULL;
	errors = data ? cJSON_AddObjectToObject(data, "errors") : NULL;
	if(assign && errors) moved = cJSON_AddObjectToObject(data, "moved");
	if(errors == NULL || (assign && moved == NULL)){
		if(r) cJSON_AddStringToObject(r, "error", "Internal error");
		return;
	}
	cJSON_ArrayForEach(item, devices){
		const char *username = cJSON_IsString(item) ? item->valuestring : NULL;
		struct device *d;
		char key[32];

		index++;
		if(!valid_username(username)){
			snprintf(key, sizeof(key), "#%lu", index);
			cJSON_AddStringToObject(errors, key, "Invalid username");
			refused++;
			continue;
		}
		d = device_find(username);
		if(d == NULL){
			cJSON_AddStringToObject(errors, username, ERR_NOT_FOUND);
			refused++;
			continue;
		}
		if(assign){
			if(d->adaptor == a){
				unchanged++;
				continue;
			}
			if(d->adaptor) cJSON_AddStringToObject(moved, username, d->adaptor->username);
			device_assign(d, a);
			if(pending_printf("M %s %s\n", d->username, a->username)) journal_error = true;
		}else{
			if(d->adaptor != a){
				cJSON_AddStringToObject(errors, username, ERR_NOT_ASSIGNED);
				refused++;
				continue;
			}
			device_unassign(d);
			if(pending_printf("U %s\n", d->username)) journal_error = true;
		}
		changed++;
	}
	cJSON_AddNumberToObject(data, assign ? "assigned" : "unassigned", (double)changed);
	if(assign) cJSON_AddNumberToObject(data, "unchanged", (double)unchanged);
	if(journal_error) cJSON_AddStringToObject(r, "error", "Internal error");
	if(changed) note_changed(req, r);
	mosquitto_log_printf(MOSQ_LOG_INFO, PLUGIN_NAME ": %s/%s | %s | username=%s changed=%lu unchanged=%lu "
			"refused=%lu", req->admin_id, req->admin_username, command, a->username, changed, unchanged, refused);
}

static void send_response(struct request *req, cJSON *tree)
{
	char *payload = cJSON_PrintUnformatted(tree);
	if(payload == NULL) return;
	/* To the requesting client only: another admin's connection does not see our answers. */
	mosquitto_broker_publish_copy(req->admin_id, RESPONSE_TOPIC, (int)strlen(payload), payload, 1, false, NULL);
	free(payload);
}

static int control_callback(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_control *ed = event_data;
	struct request req;
	cJSON *tree, *commands, *cmd, *response_tree;
	size_t i, n;

	UNUSED(event);
	UNUSED(userdata);

	memset(&req, 0, sizeof(req));
	req.client = ed->client;
	req.admin_id = mosquitto_client_id(ed->client);
	req.admin_username = mosquitto_client_username(ed->client);
	if(req.admin_username == NULL) req.admin_username = "";
	response_tree = cJSON_CreateObject();
	req.responses = response_tree ? cJSON_AddArrayToObject(response_tree, "responses") : NULL;
	if(req.responses == NULL){
		cJSON_Delete(response_tree);
		return MOSQ_ERR_NOMEM;
	}

#if CJSON_VERSION_MAJOR > 1 || (CJSON_VERSION_MAJOR == 1 && (CJSON_VERSION_MINOR > 7 \
		|| (CJSON_VERSION_MINOR == 7 && CJSON_VERSION_PATCH >= 13)))
	tree = cJSON_ParseWithLength(ed->payload, ed->payloadlen);
#else
	/* Mosquitto stores every payload with a terminating 0 byte after it. */
	tree = cJSON_Parse(ed->payload);
#endif
	commands = tree ? cJSON_GetObjectItemCaseSensitive(tree, "commands") : NULL;
	if(tree == NULL){
		reply(&req, "Unknown command", "Payload not valid JSON", NULL);
	}else if(!cJSON_IsArray(commands)){
		reply(&req, "Unknown command", "Invalid/missing commands", NULL);
	}else{
		n = (size_t)cJSON_GetArraySize(commands);
		req.changed = calloc(n ? n : 1, sizeof(*req.changed));
		if(req.changed == NULL){
			cJSON_Delete(tree);
			cJSON_Delete(response_tree);
			return MOSQ_ERR_NOMEM;
		}
		cJSON_ArrayForEach(cmd, commands){
			const char *command = get_string(cmd, "command");
			const cJSON *j_corr = cJSON_GetObjectItemCaseSensitive(cmd, "correlationData");
			const char *corr = cJSON_IsString(j_corr) ? j_corr->valuestring : NULL;

			if(!cJSON_IsObject(cmd) || command == NULL){
				reply(&req, "Unknown command", "Invalid/missing command", corr);
			}else if(j_corr && !cJSON_IsString(j_corr)){
				reply(&req, command, "Invalid correlationData data type", NULL);
			}else if(!strcmp(command, "createDevices")){
				cmd_create_devices(&req, cmd, corr);
			}else if(!strcmp(command, "setDevicePassword")){
				cmd_set_password(&req, cmd, corr);
			}else if(!strcmp(command, "disableDevice")){
				cmd_set_disabled(&req, cmd, corr, true);
			}else if(!strcmp(command, "enableDevice")){
				cmd_set_disabled(&req, cmd, corr, false);
			}else if(!strcmp(command, "deleteDevice")){
				cmd_delete(&req, cmd, corr);
			}else if(!strcmp(command, "getDevice")){
				cmd_get(&req, cmd, corr);
			}else if(!strcmp(command, "findDevices")){
				cmd_find(&req, cmd, corr);
			}else if(!strcmp(command, "listDevices")){
				cmd_list(&req, cmd, corr);
			}else if(!strcmp(command, "createAdaptor")){
				cmd_create_adaptor(&req, cmd, corr);
			}else if(!strcmp(command, "setAdaptorPassword")){
				cmd_set_adaptor_password(&req, cmd, corr);
			}else if(!strcmp(command, "disableAdaptor")){
				cmd_set_adaptor_disabled(&req, cmd, corr, true);
			}else if(!strcmp(command, "enableAdaptor")){
				cmd_set_adaptor_disabled(&req, cmd, corr, false);
			}else if(!strcmp(command, "deleteAdaptor")){
				cmd_delete_adaptor(&req, cmd, corr);
			}else if(!strcmp(command, "getAdaptor")){
				cmd_get_adaptor(&req, cmd, corr);
			}else if(!strcmp(command, "listAdaptors")){
				cmd_list_adaptors(&req, cmd, corr);
			}else if(!strcmp(command, "listAdaptorDevices")){
				cmd_list_adaptor_devices(&req, cmd, corr);
			}else if(!strcmp(command, "assignDevices")){
				cmd_assign(&req, cmd, corr, true);
			}else if(!strcmp(command, "unassignDevices")){
				cmd_assign(&req, cmd, corr, false);
			}else{
				reply(&req, command, "Unknown command", corr);
			}
		}
		/* Changes are on disk before anyone is told they were made. */
		if(journal_flush()){
			for(i = 0; i < req.changed_count; i++){
				cJSON_DeleteItemFromObjectCaseSensitive(req.changed[i], "error");
				cJSON_AddStringToObject(req.changed[i], "error", "Could not save the devices file");
			}
		}
		free(req.changed);
	}
	cJSON_Delete(tree);
	send_response(&req, response_tree);
	cJSON_Delete(response_tree);
	return MOSQ_ERR_SUCCESS;
}

/* ---------------------------------------------------------------------------------------------------
 * Plugin entry points
 * ------------------------------------------------------------------------------------------------- */

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	int i;
	for(i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

static int configure_types(const char *list)
{
	char *copy = mosquitto_strdup(list), *save = NULL, *t;
	int allowed = 0, i;

	if(copy == NULL) return -1;
	for(t = strtok_r(copy, ", ", &save); t; t = strtok_r(NULL, ", ", &save)){
		i = type_index(t, true);
		if(i < 0){
			mosquitto_log_printf(MOSQ_LOG_ERR, PLUGIN_NAME ": invalid device type \"%s\" in device_types", t);
			mosquitto_free(copy);
			return -1;
		}
		type_allowed[i] = true;
		allowed++;
	}
	mosquitto_free(copy);
	return allowed > 0 ? 0 : -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata, struct mosquitto_opt *options,
		int option_count)
{
	const char *types_opt = NULL;
	int i;

	UNUSED(userdata);

	for(i = 0; i < option_count; i++){
		if(!strcmp(options[i].key, "devices_file")){
			journal_path = mosquitto_strdup(options[i].value);
			if(journal_path == NULL) return MOSQ_ERR_NOMEM;
		}else if(!strcmp(options[i].key, "device_types")){
			types_opt = options[i].value;
		}
	}
	if(journal_path == NULL || types_opt == NULL){
		mosquitto_log_printf(MOSQ_LOG_ERR, PLUGIN_NAME ": plugin_opt_devices_file and plugin_opt_device_types "
				"are required");
		return MOSQ_ERR_INVAL;
	}
	if(configure_types(types_opt)){
		mosquitto_log_printf(MOSQ_LOG_ERR, PLUGIN_NAME ": plugin_opt_device_types lists no valid device type");
		return MOSQ_ERR_INVAL;
	}
	if(journal_load()) return MOSQ_ERR_UNKNOWN;

	plg_id = identifier;
	if(mosquitto_callback_register(plg_id, MOSQ_EVT_BASIC_AUTH, basic_auth_callback, NULL, NULL)
			|| mosquitto_callback_register(plg_id, MOSQ_EVT_ACL_CHECK, acl_check_callback, NULL, NULL)
			|| mosquitto_callback_register(plg_id, MOSQ_EVT_CONTROL, control_callback, CONTROL_TOPIC, NULL)){
		mosquitto_log_printf(MOSQ_LOG_ERR, PLUGIN_NAME ": cannot register callbacks");
		return MOSQ_ERR_UNKNOWN;
	}
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	size_t i;

	UNUSED(userdata);
	UNUSED(options);
	UNUSED(option_count);

	if(plg_id){
		mosquitto_callback_unregister(plg_id, MOSQ_EVT_BASIC_AUTH, basic_auth_callback, NULL);
		mosquitto_callback_unregister(plg_id, MOSQ_EVT_ACL_CHECK, acl_check_callback, NULL);
		mosquitto_callback_unregister(plg_id, MOSQ_EVT_CONTROL, control_callback, CONTROL_TOPIC);
		plg_id = NULL;
	}
	if(journal_fd >= 0){
		close(journal_fd);
		journal_fd = -1;
	}
	table_free();
	for(i = 0; i < type_count; i++) mosquitto_free(types[i]);
	type_count = 0;
	free(pending.data);
	pending.data = NULL;
	pending.len = pending.cap = 0;
	mosquitto_free(journal_path);
	journal_path = NULL;
	return MOSQ_ERR_SUCCESS;
}
