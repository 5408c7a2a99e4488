#ifndef TABSYNC_CCURL_SHIM_H
#define TABSYNC_CCURL_SHIM_H

// libcurl (Debian: libcurl4-openssl-dev), for TabSyncAuth's CurlTransport. Swift cannot call
// C variadic functions, so each option type gets a typed wrapper of curl_easy_setopt and
// curl_easy_getinfo here.
#include <curl/curl.h>

static inline CURLcode tabsync_curl_set_long(CURL *handle, CURLoption option, long value) {
    return curl_easy_setopt(handle, option, value);
}

static inline CURLcode tabsync_curl_set_string(CURL *handle, CURLoption option, const char *value) {
    return curl_easy_setopt(handle, option, value);
}

static inline CURLcode tabsync_curl_set_size(CURL *handle, CURLoption option, curl_off_t value) {
    return curl_easy_setopt(handle, option, value);
}

static inline CURLcode tabsync_curl_set_pointer(CURL *handle, CURLoption option, void *value) {
    return curl_easy_setopt(handle, option, value);
}

static inline CURLcode tabsync_curl_set_headers(CURL *handle, struct curl_slist *headers) {
    return curl_easy_setopt(handle, CURLOPT_HTTPHEADER, headers);
}

typedef size_t (*tabsync_curl_write_callback)(char *data, size_t size, size_t count, void *context);

static inline CURLcode tabsync_curl_set_write(CURL *handle, tabsync_curl_write_callback callback, void *context) {
    CURLcode code = curl_easy_setopt(handle, CURLOPT_WRITEFUNCTION, callback);
    return code != CURLE_OK ? code : curl_easy_setopt(handle, CURLOPT_WRITEDATA, context);
}

/// Only HTTP and HTTPS, for the request and for any redirect (none is followed).
static inline CURLcode tabsync_curl_allow_http_only(CURL *handle) {
#if LIBCURL_VERSION_NUM >= 0x075500
    return curl_easy_setopt(handle, CURLOPT_PROTOCOLS_STR, "http,https");
#else
    return curl_easy_setopt(handle, CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
}

static inline long tabsync_curl_info_long(CURL *handle, CURLINFO info) {
    long value = 0;
    return curl_easy_getinfo(handle, info, &value) == CURLE_OK ? value : 0;
}

static inline curl_off_t tabsync_curl_info_off(CURL *handle, CURLINFO info) {
    curl_off_t value = 0;
    return curl_easy_getinfo(handle, info, &value) == CURLE_OK ? value : 0;
}

/// The result of the finished transfer in `message`, or -1 when it is not a "done" message.
static inline int tabsync_curl_done_result(const CURLMsg *message) {
    return message->msg == CURLMSG_DONE ? (int)message->data.result : -1;
}

#endif
