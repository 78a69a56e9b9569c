{{ config(meta={"dagster": {"ref": {"name": "fct_ctr_samples"}}}) }}

-- Grain rule: fct_ratings and fct_ctr_samples have exactly one row per stg_interactions row
-- (same event_ids, no extra, none missing; uniqueness is the generic unique tests), the
-- fct_ratings row carries the same user, item, rating and ts, and both marts agree on split,
-- ts and indices. Returns the offending event_ids (none = pass).

with

interactions as (

    select event_id, user_id, item_id, rating, ts from {{ ref('stg_interactions') }}

),

ratings as (

    select * from {{ ref('fct_ratings') }}

),

ctr_samples as (

    select event_id, split, ts, user_idx, item_idx from {{ ref('fct_ctr_samples') }}

),

rating_failures as (

    select
        coalesce(interactions.event_id, ratings.event_id) as event_id,
        case
            when ratings.event_id is null then 'interaction missing from fct_ratings'
            when interactions.event_id is null then 'fct_ratings row without an interaction'
            else 'fct_ratings row differs from its interaction'
        end as failure
    from interactions
    full outer join ratings on ratings.event_id = interactions.event_id
    where ratings.event_id is null
       or interactions.event_id is null
       or ratings.user_id <> interactions.user_id
       or ratings.item_id <> interactions.item_id
       or ratings.rating <> interactions.rating
       or ratings.ts <> interactions.ts

),

ctr_failures as (

    select
        coalesce(ratings.event_id, ctr_samples.event_id) as event_id,
        case
            when ctr_samples.event_id is null then 'interaction missing from fct_ctr_samples'
            when ratings.event_id is null then 'fct_ctr_samples row without an interaction'
            else 'fct_ctr_samples row disagrees with fct_ratings'
        end as failure
    from ratings
    full outer join ctr_samples on ctr_samples.event_id = ratings.event_id
    where ctr_samples.event_id is null
       or ratings.event_id is null
       or ctr_samples.split <> ratings.split
       or ctr_samples.ts <> ratings.ts
       or ctr_samples.user_idx <> ratings.user_idx
       or ctr_samples.item_idx <> ratings.item_idx

)

select * from rating_failures
union all
select * from ctr_failures
