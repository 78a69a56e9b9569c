-- one row per user with at least one train event

with

user_vocab as (

    select * from {{ ref('int_user_vocab') }}

),

user_features as (

    select * from {{ ref('int_user_features') }}

),

final as (

    select
        user_vocab.user_idx,
        user_vocab.user_id,
        user_features.gender,
        user_features.age,
        user_features.occupation,
        coalesce(user_features.gender_idx, 0) as gender_idx,
        coalesce(user_features.age_idx, 0) as age_idx,
        coalesce(user_features.occupation_idx, 0) as occupation_idx,
        user_vocab.n_train_events
    from user_vocab
    left join user_features on user_features.user_id = user_vocab.user_id

)

select * from final
