-- one row per accepted interaction: labels, sparse indices, z-scored dense features, history

with

events as (

    select * from {{ ref('int_user_history') }}

),

user_vocab as (

    select user_id, user_idx, n_train_events from {{ ref('int_user_vocab') }}

),

item_vocab as (

    select item_id, n_train_events from {{ ref('int_item_vocab') }}

),

user_features as (

    select user_id, gender_idx, age_idx, occupation_idx from {{ ref('int_user_features') }}

),

item_features as (

    select item_id, year, genre_idx, year_idx from {{ ref('int_item_features') }}

),

dense_stats as (

    select * from {{ ref('int_dense_feature_stats') }}

),

joined as (

    select
        events.*,
        user_vocab.user_idx,
        user_vocab.n_train_events as user_n_train_events,
        item_vocab.n_train_events as item_n_train_events,
        user_features.gender_idx,
        user_features.age_idx,
        user_features.occupation_idx,
        item_features.genre_idx,
        item_features.year_idx,
        {{ recsys.utc_year('events.ts') }} - item_features.year as item_age
    from events
    left join user_vocab on user_vocab.user_id = events.user_id
    left join item_vocab on item_vocab.item_id = events.item_id
    left join user_features on user_features.user_id = events.user_id
    left join item_features on item_features.item_id = events.item_id

),

final as (

    select
        joined.event_id,
        joined.split,
        joined.ts,
        case when joined.rating >= {{ var('like_threshold') }} then 1 else 0 end as label_like,
        case when joined.rating >= {{ var('love_threshold') }} then 1 else 0 end as label_love,

        -- sparse (0 = unknown / outside the train vocabulary)
        coalesce(joined.user_idx, 0) as user_idx,
        joined.item_idx,
        coalesce(joined.gender_idx, 0) as gender_idx,
        coalesce(joined.age_idx, 0) as age_idx,
        coalesce(joined.occupation_idx, 0) as occupation_idx,
        coalesce(joined.genre_idx, 0) as genre_idx,
        coalesce(joined.year_idx, 0) as year_idx,
        {{ recsys.utc_hour('joined.ts') }} + 1 as hour_idx,
        {{ recsys.utc_iso_weekday('joined.ts') }} as weekday_idx,

        -- dense, z-scored with train statistics; cold user/item or unknown year -> 0
        {{ dbt.cast(
            'coalesce((ln(1 + joined.user_n_train_events) - dense_stats.user_activity_mean)
                / nullif(dense_stats.user_activity_std, 0), 0)',
            recsys.type_double()) }} as dense_user_activity,
        {{ dbt.cast(
            'coalesce((ln(1 + joined.item_n_train_events) - dense_stats.item_popularity_mean)
                / nullif(dense_stats.item_popularity_std, 0), 0)',
            recsys.type_double()) }} as dense_item_popularity,
        {{ dbt.cast(
            'coalesce((joined.item_age - dense_stats.item_age_mean)
                / nullif(dense_stats.item_age_std, 0), 0)',
            recsys.type_double()) }} as dense_item_age,

        joined.history_item_idx,
        joined.history_len
    from joined
    cross join dense_stats

)

select * from final
