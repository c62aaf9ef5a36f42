/* blkgen: latency histogram merge and quantiles (the buckets are in blkgen.h). */
#include "blkgen.h"

void hist_merge(struct hist *into, const struct hist *from) {
  into->count += from->count;
  into->sum_ns += from->sum_ns;
  if (from->max_ns > into->max_ns) into->max_ns = from->max_ns;
  for (unsigned i = 0; i < HIST_BUCKETS; i++) into->bucket[i] += from->bucket[i];
}

/* Lowest value of bucket i and its width. */
static void bucket_range(unsigned i, double *low, double *width) {
  if (i < 2 * HIST_SUB) {
    *low = i;
    *width = 1;
    return;
  }
  unsigned shift = i / HIST_SUB - 1;
  *low = (double)((uint64_t)(HIST_SUB + i % HIST_SUB) << shift);
  *width = (double)((uint64_t)1 << shift);
}

double hist_quantile(const struct hist *h, double q) {
  if (h->count == 0) return 0;
  /* The sample of rank ceil(q * count) (1-based), as fio's percentiles do. */
  uint64_t rank = (uint64_t)(q * (double)h->count);
  if ((double)rank < q * (double)h->count) rank++;
  if (rank == 0) rank = 1;
  uint64_t seen = 0;
  for (unsigned i = 0; i < HIST_BUCKETS; i++) {
    seen += h->bucket[i];
    if (seen >= rank) {
      double low, width;
      bucket_range(i, &low, &width);
      double mid = low + width / 2;
      return mid > (double)h->max_ns ? (double)h->max_ns : mid;
    }
  }
  return (double)h->max_ns;
}
